//! Project automation (the xtask pattern): `cargo xtask up` starts NATS and
//! the three services locally and seeds a demo; `cargo xtask token` prints
//! a development bearer token; `cargo xtask test` installs what is missing
//! and runs every check CI runs; `cargo xtask bench` runs the benchmark.

mod bench;
mod deploy_check;
mod install;
mod procs;
mod test;
mod token;
mod up;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "gpualloc project tasks")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run NATS and the three services locally, seed a demo pool and quota,
    /// and print grpcurl commands. Ctrl-C stops everything.
    Up(up::Args),
    /// Install what is missing, then run fmt, clippy, buf lint and every
    /// test against a throwaway NATS and PostgreSQL.
    Test(test::Args),
    /// Build in release and run the full benchmark; writes
    /// docs/benchmarks/latest.{json,md,svg}.
    Bench(bench::Args),
    /// Print a bearer token signed by the local development key (the one
    /// `cargo xtask up` trusts), and nothing else:
    /// `grpcurl -H "authorization: Bearer $(cargo xtask token --tenant demo)" …`
    Token(token::Args),
    /// Check that what ships is what the workspace builds: hadolint on the
    /// Dockerfile, and its binaries against the service crates.
    DeployCheck(deploy_check::Args),
    /// Write the NATS server configurations of deploy/ from the bus
    /// permissions (gpualloc-nats-acl); a test fails when they differ.
    NatsConf,
    /// Write the PrometheusRule of deploy/components/monitoring from the
    /// alert rules next to it; a test fails when they differ.
    AlertRules,
}

/// The workspace root (xtask lives one level below it).
pub fn root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map(PathBuf::from).unwrap_or(manifest)
}

/// `cargo`, without the variables cargo set for running xtask itself.
/// Build scripts that watch one of them (ring watches
/// `CARGO_MANIFEST_DIR`) would otherwise see it change between a build
/// from xtask and one from the shell, and rebuild with their dependants —
/// minutes of release build each time one follows the other.
pub fn cargo() -> std::process::Command {
    let mut cmd = std::process::Command::new("cargo");
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if [
            "CARGO_MANIFEST_",
            "CARGO_PKG_",
            "CARGO_CRATE_",
            "CARGO_BIN_",
        ]
        .iter()
        .any(|p| key.starts_with(p))
            || key == "CARGO_PRIMARY_PACKAGE"
        {
            cmd.env_remove(key);
        }
    }
    cmd
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().command {
        Command::Up(args) => up::run(args),
        Command::Test(args) => test::run(args),
        Command::Bench(args) => bench::run(args),
        Command::Token(args) => token::run(args),
        Command::DeployCheck(args) => deploy_check::run(args),
        Command::NatsConf => deploy_check::write_nats_conf(),
        Command::AlertRules => deploy_check::write_alert_rules(),
    }
}
