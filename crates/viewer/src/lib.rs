//! The viewer service: the CQRS read side. It consumes every event of the
//! saga from JetStream and keeps read models in its own database (views of
//! allocations, their history, tenant summaries), which its gRPC API
//! serves. It never calls the other services, so it keeps answering while
//! they are down; its views may lag by the event backlog.

use std::{future::Future, net::SocketAddr, sync::Arc};

use gpualloc_platform::{CommonConfig, Platform, telemetry::LogFormat};
use gpualloc_proto::viewer::v1::viewer_service_server::ViewerServiceServer;
use gpualloc_saga::{ConsumerSpec, subjects};
use gpualloc_storage::Migration;
use tokio::net::TcpListener;
use tonic::server::NamedService;

mod error;
pub mod projection;
mod schema;
mod service;
pub mod store;

pub use error::Error;
pub use projection::Projection;
pub use service::ViewerApi;

/// The fully-qualified gRPC service name (also its health-check name).
pub const SERVICE_NAME: &str = <ViewerServiceServer<ViewerApi> as NamedService>::NAME;

/// Durable consumer name, shared by all replicas.
pub const CONSUMER: &str = "viewer";

pub const MIGRATIONS: &[Migration] = &[Migration {
    version: "viewer_0001_views",
    up: include_str!("../migrations/0001_views.sql"),
}];

/// Settings of the viewer service.
#[derive(clap::Parser, Clone, Debug)]
#[command(name = "gpualloc-viewer", version, about = "gpualloc viewer service")]
pub struct Config {
    /// Address to serve gRPC on.
    #[arg(long, env = "GPUALLOC_LISTEN", default_value = "127.0.0.1:50053")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub common: CommonConfig,

    /// Log format.
    #[arg(long, env = "GPUALLOC_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

impl Config {
    pub fn new(common: CommonConfig) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50053)),
            common,
            log_format: LogFormat::Text,
        }
    }
}

/// Runs the service on `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let platform = Platform::new(CONSUMER, SERVICE_NAME, config.common.clone());
    let api = ViewerApi::new(platform.db());
    platform.start(MIGRATIONS, |ready| {
        ready.spawn_consumer(
            ConsumerSpec::new(CONSUMER, subjects::FILTER_ALL, &ready.origin),
            Arc::new(Projection),
        );
    });
    platform
        .serve(listener, shutdown, |routes| {
            routes.add_service(ViewerServiceServer::new(api))
        })
        .await
}
