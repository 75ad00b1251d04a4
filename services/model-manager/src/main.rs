//! `model-manager`: Cohort's model registry service (see the library).

use clap::Parser;

#[tokio::main]
async fn main() {
    let args = cohort_model_manager::Args::parse();
    cohort_runtime::init_tracing(args.service.log_format);
    if let Err(e) = args.run().await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
