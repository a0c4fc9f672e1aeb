//! `cargo xtask bench`: the full benchmark in a release build (see
//! docs/benchmarks.md). Arguments after `--` go to `gpualloc-bench run`.

use std::process::Command;

use crate::{install, procs};

#[derive(clap::Args)]
pub struct Args {
    /// Passed to `gpualloc-bench run`, e.g. `-- --scenarios saga --seconds 20`,
    /// or `-- --database postgres://postgres@127.0.0.1:5432/postgres` to run
    /// every scenario on PostgreSQL as well.
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
    let mut bench = Command::new(root.join("target/release/gpualloc-bench"));
    bench
        .current_dir(&root)
        .env("PATH", path)
        .arg("run")
        .args(&args.bench_args);
    // `--database`: the PostgreSQL pass reads against pgbench, which comes
    // with the server's binaries.
    if args.bench_args.iter().any(|a| a.starts_with("--database")) {
        bench.env("GPUALLOC_PG_BIN", install::postgres_bin()?);
    }
    procs::run("gpualloc-bench run", &mut bench)
}
