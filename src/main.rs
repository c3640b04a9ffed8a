fn main() -> std::process::ExitCode {
    dwh_helper::cli::main()
}
