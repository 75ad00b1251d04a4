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
    match cli.run().await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            Failure::of(&e).print(json);
            std::process::exit(1);
        }
    }
}
