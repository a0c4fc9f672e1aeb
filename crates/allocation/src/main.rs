use clap::Parser;
use gpualloc_allocation::{Config, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    gpualloc_platform::telemetry::init(config.log_format);
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    run(config, listener, gpualloc_platform::shutdown::signal()).await
}
