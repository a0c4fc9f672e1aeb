//! One service process for the multi-process tests: `mesh-node <service>
//! [flags…]` runs the allocation, resource-pool or viewer service exactly
//! as its own binary does (settings from flags and `GPUALLOC_*`), so a test
//! can start replicas and SIGKILL them without knowing where the other
//! packages' binaries were built. It exits when the process named by
//! `GPUALLOC_TEST_PARENT_PID` is gone, so no service outlives its test.

use std::time::Duration;

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().collect();
    if args.len() < 2 {
        anyhow::bail!("usage: mesh-node <allocation|resource-pool|viewer> [flags]");
    }
    let service = args.remove(1);
    watch_parent();
    let shutdown = gpualloc_platform::shutdown::signal();
    match service.as_str() {
        "allocation" => {
            let c = gpualloc_allocation::Config::parse_from(args);
            let t = gpualloc_platform::telemetry::init(c.log_format, "gpualloc-allocation");
            let l = tokio::net::TcpListener::bind(c.listen).await?;
            let r = gpualloc_allocation::run(c, l, shutdown).await;
            t.shutdown();
            r
        }
        "resource-pool" => {
            let c = gpualloc_resource_pool::Config::parse_from(args);
            let t = gpualloc_platform::telemetry::init(c.log_format, "gpualloc-resource-pool");
            let l = tokio::net::TcpListener::bind(c.listen).await?;
            let r = gpualloc_resource_pool::run(c, l, shutdown).await;
            t.shutdown();
            r
        }
        "viewer" => {
            let c = gpualloc_viewer::Config::parse_from(args);
            if let Some(gpualloc_viewer::Command::Rebuild) = c.command {
                gpualloc_viewer::rebuild(&c.common).await?;
                return Ok(());
            }
            let t = gpualloc_platform::telemetry::init(c.log_format, "gpualloc-viewer");
            let l = tokio::net::TcpListener::bind(c.listen).await?;
            let r = gpualloc_viewer::run(c, l, shutdown).await;
            t.shutdown();
            r
        }
        other => anyhow::bail!("unknown service {other:?}"),
    }
}

fn watch_parent() {
    let Some(pid) = std::env::var("GPUALLOC_TEST_PARENT_PID").ok() else {
        return;
    };
    let path = format!("/proc/{pid}");
    tokio::spawn(async move {
        loop {
            if !std::path::Path::new(&path).exists() {
                std::process::exit(3);
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
}
