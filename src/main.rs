fn main() -> std::process::ExitCode {
    kommit::cli::main()
}
