fn main() {
    // Parsed before the async runtime starts: some settings (git's timeouts) are process-wide
    // and must be set before any thread exists.
    let cli = kommit::cli::parse();
    let code = run(cli);
    // Exit at once: a sync the operator cut short at shutdown may still hold a blocking thread,
    // and dropping the runtime would wait for it.
    std::process::exit(i32::from(code));
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn run(cli: kommit::cli::Cli) -> u8 {
    kommit::cli::main(cli).await
}
