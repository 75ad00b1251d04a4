use clap::Parser;

#[tokio::main]
async fn main() {
    let cli = cohort_cli::Cli::parse();
    match cli.run().await {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("error: {}", describe(&e));
            std::process::exit(1);
        }
    }
}

/// gRPC statuses read better as their message.
fn describe(e: &anyhow::Error) -> String {
    match e.downcast_ref::<tonic::Status>() {
        Some(s) => format!("{} ({:?})", s.message(), s.code()),
        None => format!("{e:#}"),
    }
}
