#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let code = kommit::cli::main().await;
    // Exit at once: a sync the operator cut short at shutdown may still hold a blocking thread,
    // and dropping the runtime would wait for it.
    std::process::exit(i32::from(code));
}
