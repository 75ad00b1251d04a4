use clap::Parser;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = cohort_executor::Args::parse();
    let telemetry = cohort_runtime::init_tracing(args.log_format, "executor");
    // A panic's report spans lines; its message also goes out as one line, last, for
    // task-manager to report.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        eprintln!(
            "error: executor {}",
            cohort_executor::one_line(&info.to_string())
        );
    }));
    let result = args.run().await;
    // Spans still queued go out before the process ends (exit skips destructors).
    telemetry.shutdown();
    if let Err(e) = result {
        // The last line of the log: task-manager sends it to the server as the reason.
        eprintln!("{}", cohort_executor::error_line(&e));
        std::process::exit(1);
    }
    // Not a return: a serving executor that stopped waiting may still have a read of its
    // stdin in flight on a blocking thread, which the runtime's shutdown would wait for.
    std::process::exit(0);
}
