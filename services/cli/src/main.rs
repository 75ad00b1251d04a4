use clap::Parser;
use cohort_cli::error::{Failure, json_requested};

#[tokio::main]
async fn main() {
    let cli = match cohort_cli::Cli::try_parse() {
        Ok(cli) => cli,
        // Usage errors follow --json too: look for it before clap has parsed it.
        Err(e) => match Failure::of_clap(&e) {
            Some(failure) if json_requested(std::env::args_os()) => {
                failure.print(true);
                std::process::exit(e.exit_code());
            }
            _ => e.exit(),
        },
    };
    let json = cli.json;
    // With OTEL_EXPORTER_OTLP_ENDPOINT set, the command is the root of a trace that
    // follows it through the proxy into the services.
    let telemetry = cohort_telemetry::init_traces_only("cohort-cli");
    let span = tracing::info_span!("cli", otel.name = %command_name());
    let result = tracing::Instrument::instrument(cli.run(), span).await;
    telemetry.shutdown();
    match result {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            Failure::of(&e).print(json);
            std::process::exit(1);
        }
    }
}

/// "cohort job create": the command and its subcommand as clap read them (never an
/// argument's value, which may be a secret).
fn command_name() -> String {
    use clap::CommandFactory as _;
    let mut words = vec!["cohort"];
    let matches = cohort_cli::Cli::command().try_get_matches_from(std::env::args_os());
    if let Ok(m) = &matches
        && let Some((name, sub)) = m.subcommand()
    {
        words.push(name);
        words.extend(sub.subcommand_name());
    }
    words.join(" ")
}
