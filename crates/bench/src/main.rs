use clap::Parser;
use gpualloc_bench::{Cli, Command};

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Node { service, args } => {
            runtime.block_on(gpualloc_bench::mesh::node(&service, args))
        }
        Command::Run(args) => runtime.block_on(gpualloc_bench::run(args)),
    }
}
