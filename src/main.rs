//! The `sheepdog` binary: see `sheepdog --help`.

fn main() -> std::process::ExitCode {
    sheepdog::cli::main()
}
