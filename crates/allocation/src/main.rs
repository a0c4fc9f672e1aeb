use clap::Parser;
use gpualloc_allocation::{Command, Config, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    if let Some(Command::Outbox(args)) = &config.command {
        print!(
            "{}",
            gpualloc_platform::outbox_cmd::run(&config.common, args).await?
        );
        return Ok(());
    }
    let telemetry = gpualloc_platform::telemetry::init(config.log_format, "gpualloc-allocation");
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let result = run(config, listener, gpualloc_platform::shutdown::signal()).await;
    telemetry.shutdown();
    result
}
