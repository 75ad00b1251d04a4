use clap::Parser;

#[tokio::main]
async fn main() {
    let args = cohort_job_scheduler::Args::parse();
    let telemetry = cohort_runtime::init_tracing(args.service.log_format, "job-scheduler");
    let result = args.run().await;
    // Spans still queued go out before the process ends.
    telemetry.shutdown();
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
