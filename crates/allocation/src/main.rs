use clap::Parser;
use gpualloc_allocation::{Config, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let telemetry = gpualloc_platform::telemetry::init(config.log_format, "gpualloc-allocation");
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let result = run(config, listener, gpualloc_platform::shutdown::signal()).await;
    telemetry.shutdown();
    result
}
