use clap::Parser;
use gpualloc_viewer::{Command, Config, rebuild, run};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let config = Config::parse();
    let telemetry = gpualloc_platform::telemetry::init(config.log_format, "gpualloc-viewer");
    match config.command {
        Some(Command::Rebuild) => {
            let done = rebuild(&config.common).await?;
            println!(
                "rebuilt the read models from {} messages ({} undecodable, skipped)",
                done.messages, done.skipped
            );
            return Ok(());
        }
        Some(Command::Notifications {
            status,
            limit,
            requeue,
        }) => return gpualloc_viewer::notifications(&config.common, &status, limit, requeue).await,
        Some(Command::Outbox(args)) => {
            print!(
                "{}",
                gpualloc_platform::outbox_cmd::run(&config.common, &args).await?
            );
            return Ok(());
        }
        None => {}
    }
    let listener = tokio::net::TcpListener::bind(config.listen).await?;
    let result = run(config, listener, gpualloc_platform::shutdown::signal()).await;
    telemetry.shutdown();
    result
}
