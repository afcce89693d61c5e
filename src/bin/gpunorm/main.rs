//! `gpunorm`: the command line of ../shared/CLI.md — apply, demo, adapters,
//! bench.

/// `println!` that returns an error instead of panicking when stdout cannot
/// be written (a closed pipe, a full disk): CLI.md allows no panic.
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*)
            .map_err(|e| gpunorm::Error::File(format!("cannot write to stdout: {e}")))
    }};
}

mod adapters;
mod apply;
mod bench;
mod demo;
mod sweep;
mod tensors;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Neural-network normalization on the GPU (WGSL + wgpu), with PyTorch and
/// Keras semantics, on safetensors files.
#[derive(Parser)]
#[command(name = "gpunorm", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Normalize the tensor `input` of a safetensors file (forward, running
    /// statistics, and the backward pass when `grad_output` is present).
    Apply(apply::ApplyArgs),
    /// Run every op at a default size, check it against the f64 host
    /// reference and print a table. Exits non-zero if any is out of tolerance.
    Demo(demo::DemoArgs),
    /// List the adapters wgpu can see.
    Adapters,
    /// Time an op on the device (timestamp queries, else wall clock) with the
    /// adapter's copy bandwidth measured in the same run; `--sweep` for GB/s
    /// against length.
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    gpunorm::ensure_runtime_dir();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Apply(args) => apply::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Adapters => adapters::run(),
        Command::Bench(args) => bench::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            let message = e.to_string().replace('\n', " ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}
