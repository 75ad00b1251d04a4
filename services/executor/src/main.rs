use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = cohort_executor::Args::parse();
    cohort_runtime::init_tracing(args.log_format);
    if let Err(e) = args.run().await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
