//! The `sheepdog` binary: see `sheepdog --help`.

/// mimalloc: fewer instructions per allocation than glibc malloc on the request path, and flatter RSS under many
/// concurrent streams (see BENCHMARKS.md).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    sheepdog::cli::main()
}
