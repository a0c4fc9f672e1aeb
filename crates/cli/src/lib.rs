//! `gpualloc`, the command line of gpualloc: the daily work of a platform
//! team — allocate, look, wait, renew, cancel, approve; pools, quotas, the
//! hold queue, usage and a summary — as short commands with readable
//! tables, or the exact API messages as JSON or YAML for scripts. It talks
//! gRPC to the three services with the generated clients; connection and
//! identity come from kubectl-like contexts, environment variables and
//! flags, and with nothing configured from the local mesh of
//! `cargo xtask up`. Exit codes follow the gRPC status (see [`exit`]).

pub mod commands;
pub mod config;
pub mod connect;
pub mod exit;
pub mod input;
pub mod output;

use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use crate::{exit::Failure, output::Format};

/// gpualloc: allocate CPU, memory, GPUs, storage and custom resources.
#[derive(Debug, Parser)]
#[command(
    name = "gpualloc",
    version,
    after_help = "With nothing configured, gpualloc talks to the mesh of `cargo xtask up` as tenant \
                  `demo` (context `local`; `--context local-admin` for an administrator).\n\
                  Exit codes: 0 ok, 1 other errors, 2 usage, 3 invalid argument, 4 not found, \
                  5 conflict, 6 permission denied, 7 unauthenticated, 8 failed precondition \
                  (quota, state), 9 resource exhausted, 10 unavailable or deadline exceeded, \
                  11 the allocation was rejected, cancelled or expired (--wait), 130 interrupted."
)]
pub struct Cli {
    #[command(flatten)]
    pub global: Global,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every command takes.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Output: table, wide, json, yaml (json and yaml print the API
    /// messages as they are), csv (usage only).
    #[arg(
        short,
        long,
        global = true,
        default_value = "table",
        env = "GPUALLOC_OUTPUT"
    )]
    pub output: Format,
    /// Leave out table headers.
    #[arg(long, global = true)]
    pub no_headers: bool,
    /// The context to use (from the config file, or `local` / `local-admin`).
    #[arg(long, global = true, env = "GPUALLOC_CONTEXT")]
    pub context: Option<String>,
    /// The config file.
    #[arg(long, global = true, env = "GPUALLOC_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    /// Bearer token (overrides the context's).
    #[arg(long, global = true, env = "GPUALLOC_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// One address for all three services (an Istio gateway).
    #[arg(long, global = true, env = "GPUALLOC_GATEWAY")]
    pub gateway: Option<String>,
    /// The allocation service (replicas comma-separated).
    #[arg(long, global = true, env = "GPUALLOC_ALLOCATION_ADDR")]
    pub allocation_addr: Option<String>,
    /// The resource pool service (replicas comma-separated).
    #[arg(long, global = true, env = "GPUALLOC_RESOURCE_POOL_ADDR")]
    pub resource_pool_addr: Option<String>,
    /// The viewer (replicas comma-separated).
    #[arg(long, global = true, env = "GPUALLOC_VIEWER_ADDR")]
    pub viewer_addr: Option<String>,
    /// CA certificate (PEM) for https:// addresses.
    #[arg(long, global = true, env = "GPUALLOC_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// Where `cargo xtask up` keeps its state (the local contexts sign
    /// their tokens with its development key).
    #[arg(long, global = true, env = "GPUALLOC_STATE_DIR")]
    pub state_dir: Option<std::path::PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Allocations: create, get, list, cancel, approve, reject, renew, history.
    #[command(subcommand)]
    Alloc(commands::alloc::Alloc),
    /// Follow allocations as they change (a live table on a terminal).
    Watch(commands::watch::Watch),
    /// Pools: list, get, put, delete.
    #[command(subcommand)]
    Pools(commands::pools::Pools),
    /// A tenant's quota: get, set (partial updates).
    #[command(subcommand)]
    Quota(commands::quota::Quota),
    /// The hold queue, in admission order.
    Held(commands::held::Held),
    /// Usage per allocation and totals (with costs when a rate card is set).
    Usage(commands::usage::Usage),
    /// A tenant's allocations per state and its quota use.
    Summary(commands::summary::Summary),
    /// Contexts: view, get-contexts, use-context, set-context.
    #[command(subcommand)]
    Config(commands::config_cmd::ConfigCmd),
    /// Shell completions: `gpualloc completion bash > /etc/bash_completion.d/gpualloc`.
    Completion { shell: clap_complete::Shell },
    /// The man page (roff): `gpualloc man > gpualloc.1`.
    Man,
}

/// Runs the command line; what `main` returns.
pub async fn main(cli: Cli) -> ExitCode {
    match run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            f.report();
            f.code()
        }
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let Cli { global, command } = cli;
    match command {
        Command::Completion { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut cmd, "gpualloc", &mut script);
            output::out(&String::from_utf8_lossy(&script));
            Ok(())
        }
        Command::Man => {
            let cmd = <Cli as clap::CommandFactory>::command();
            let mut page = Vec::new();
            clap_mangen::Man::new(cmd)
                .render(&mut page)
                .map_err(|e| Failure::other(e.to_string()))?;
            output::out(&String::from_utf8_lossy(&page));
            Ok(())
        }
        Command::Config(c) => commands::config_cmd::run(&global, c),
        command => {
            let session = connect::Session::open(&global).await?;
            match command {
                Command::Alloc(c) => commands::alloc::run(&session, c).await,
                Command::Watch(c) => commands::watch::run(&session, c).await,
                Command::Pools(c) => commands::pools::run(&session, c).await,
                Command::Quota(c) => commands::quota::run(&session, c).await,
                Command::Held(c) => commands::held::run(&session, c).await,
                Command::Usage(c) => commands::usage::run(&session, c).await,
                Command::Summary(c) => commands::summary::run(&session, c).await,
                Command::Config(_) | Command::Completion { .. } | Command::Man => Ok(()),
            }
        }
    }
}
