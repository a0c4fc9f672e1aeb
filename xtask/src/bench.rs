//! `cargo xtask bench`: the full benchmark in a release build (see
//! docs/benchmarks.md), on SQLite and on PostgreSQL. Arguments after `--`
//! go to `gpualloc-bench run`.

use std::process::Command;

use crate::{install, procs, test};

#[derive(clap::Args)]
pub struct Args {
    /// Only SQLite: no PostgreSQL pass.
    #[arg(long)]
    sqlite_only: bool,
    /// Passed to `gpualloc-bench run`, e.g. `-- --scenarios saga --seconds 20`.
    /// Without `-- --database postgres://…` the PostgreSQL pass runs on a
    /// throwaway cluster started here with PostgreSQL's durable defaults.
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
    let given = args.bench_args.iter().any(|a| a.starts_with("--database"));
    let scratch = std::env::temp_dir().join(format!("gpualloc-bench-{}", std::process::id()));
    // Stopped (and its data removed) when dropped.
    let cluster = if !given && !args.sqlite_only {
        std::fs::create_dir_all(&scratch)?;
        Some(test::Cluster::start(&scratch, true)?)
    } else {
        None
    };
    if let Some(c) = &cluster {
        bench.args([
            "--database",
            &format!("postgres://postgres@127.0.0.1:{}/postgres", c.port),
        ]);
    }
    // The PostgreSQL pass reads against pgbench, which comes with the
    // server's binaries.
    if given || !args.sqlite_only {
        bench.env("GPUALLOC_PG_BIN", install::postgres_bin()?);
    }
    let result = procs::run("gpualloc-bench run", &mut bench);
    drop(cluster);
    let _ = std::fs::remove_dir_all(&scratch);
    result
}
