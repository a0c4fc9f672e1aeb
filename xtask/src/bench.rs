//! `cargo xtask bench`: the full benchmark in a release build (see
//! docs/benchmarks.md). Arguments after `--` go to `gpualloc-bench run`.

use std::process::Command;

use crate::{install, procs};

#[derive(clap::Args)]
pub struct Args {
    /// Passed to `gpualloc-bench run`, e.g. `-- --scenarios saga --seconds 20`.
    #[arg(last = true)]
    bench_args: Vec<String>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let root = crate::root();
    install::libpq()?;
    let nats = install::nats_server()?;
    procs::run(
        "cargo build --release -p gpualloc-bench",
        crate::cargo()
            .current_dir(&root)
            .args(["build", "--release", "-p", "gpualloc-bench"]),
    )?;
    // The harness starts nats-server from PATH.
    let path = match (nats.parent(), std::env::var_os("PATH")) {
        (Some(dir), Some(p)) => {
            let mut dirs = vec![dir.to_path_buf()];
            dirs.extend(std::env::split_paths(&p));
            std::env::join_paths(dirs)?
        }
        (_, p) => p.unwrap_or_default(),
    };
    procs::run(
        "gpualloc-bench run",
        Command::new(root.join("target/release/gpualloc-bench"))
            .current_dir(&root)
            .env("PATH", path)
            .arg("run")
            .args(&args.bench_args),
    )
}
