//! The viewer service: the CQRS read side. It consumes every event of the
//! saga from JetStream and keeps read models in its own database (views of
//! allocations, their history, tenant summaries), which its gRPC API
//! serves. It never calls the other services, so it keeps answering while
//! they are down; its views may lag by the event backlog.

use std::{future::Future, net::SocketAddr, path::PathBuf, sync::Arc};

use gpualloc_platform::{CommonConfig, Platform, telemetry::LogFormat};
use gpualloc_proto::viewer::v1::viewer_service_server::ViewerServiceServer;
use gpualloc_saga::{ConsumerSpec, subjects};
use gpualloc_storage::Migration;
use tokio::net::TcpListener;
use tonic::server::NamedService;

mod error;
mod metrics;
pub mod notifications;
pub mod projection;
mod rebuild;
mod schema;
mod service;
pub mod store;
pub mod usage;
pub mod watch;
mod wire;

pub use error::Error;
pub use projection::Projection;
pub use rebuild::{Rebuilt, rebuild};
pub use service::ViewerApi;

/// The fully-qualified gRPC service name (also its health-check name).
pub const SERVICE_NAME: &str = <ViewerServiceServer<ViewerApi> as NamedService>::NAME;

/// Durable consumer name, shared by all replicas.
pub const CONSUMER: &str = "viewer";

/// Where `/metrics` is served unless `GPUALLOC_METRICS_LISTEN` says otherwise.
pub const METRICS_PORT: u16 = 9093;

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: "viewer_0001_views",
        up: include_str!("../migrations/0001_views.sql"),
    },
    Migration {
        version: "viewer_0002_watch_notify",
        up: include_str!("../migrations/0002_watch_notify.sql"),
    },
    Migration {
        version: "viewer_0003_watch_keys",
        up: include_str!("../migrations/0003_watch_keys.sql"),
    },
    Migration {
        version: "viewer_0004_history_actor",
        up: include_str!("../migrations/0004_history_actor.sql"),
    },
];

/// Settings of the viewer service.
#[derive(clap::Parser, Clone, Debug)]
#[command(name = "gpualloc-viewer", version, about = "gpualloc viewer service")]
pub struct Config {
    /// Address to serve gRPC on.
    #[arg(long, env = "GPUALLOC_LISTEN", default_value = "127.0.0.1:50053")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub common: CommonConfig,

    /// JSON rate card for usage reports (see docs/operations.md); without
    /// one, reports carry no costs.
    #[arg(long, env = "GPUALLOC_RATE_CARD")]
    pub rate_card: Option<PathBuf>,

    /// Messages a watcher may have unread before it is ended with
    /// RESOURCE_EXHAUSTED.
    #[arg(long, env = "GPUALLOC_WATCH_BUFFER", default_value_t = watch::BUFFER)]
    pub watch_buffer: usize,

    /// Open WatchAllocations streams this replica serves in all, and per
    /// tenant; past them a new watch gets RESOURCE_EXHAUSTED.
    #[arg(long, env = "GPUALLOC_MAX_WATCHERS", default_value_t = watch::MAX_WATCHERS)]
    pub max_watchers: usize,

    #[arg(long, env = "GPUALLOC_MAX_WATCHERS_PER_TENANT", default_value_t = watch::MAX_WATCHERS_PER_TENANT)]
    pub max_watchers_per_tenant: usize,

    /// JSON notification settings: channels, lease warning, retries (see
    /// docs/notifications.md); without them, nothing is sent.
    #[arg(long, env = "GPUALLOC_NOTIFY_CONFIG")]
    pub notify_config: Option<PathBuf>,

    #[command(subcommand)]
    pub command: Option<Command>,

    /// Log format.
    #[arg(long, env = "GPUALLOC_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,
}

/// What to do instead of serving.
#[derive(clap::Subcommand, Clone, Debug)]
pub enum Command {
    /// Drop the read models and rebuild them from the whole stream (stop
    /// the viewer's replicas first).
    Rebuild,
    /// List notification deliveries (parked ones by default) and requeue
    /// parked ones after fixing their channel.
    Notifications {
        /// Which deliveries to list.
        #[arg(long, default_value = "PARKED", ignore_case = true,
              value_parser = ["PENDING", "DELIVERED", "PARKED", "ALL"])]
        status: String,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Put every parked delivery back in the queue.
        #[arg(long)]
        requeue: bool,
    },
    /// List outbox rows set aside after failing to publish; requeue them.
    Outbox(gpualloc_platform::outbox_cmd::OutboxArgs),
}

impl Config {
    pub fn new(common: CommonConfig) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50053)),
            common,
            rate_card: None,
            watch_buffer: watch::BUFFER,
            max_watchers: watch::MAX_WATCHERS,
            max_watchers_per_tenant: watch::MAX_WATCHERS_PER_TENANT,
            notify_config: None,
            command: None,
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
    let rates = config
        .rate_card
        .as_deref()
        .map(usage::RateCard::load)
        .transpose()?;
    let notify = config
        .notify_config
        .as_deref()
        .map(notifications::Settings::load)
        .transpose()?
        .map(Arc::new);
    metrics::register();
    let platform = Platform::new(CONSUMER, SERVICE_NAME, METRICS_PORT, config.common.clone());
    let changes = watch::Changes::default();
    let api = ViewerApi::new(platform.db(), changes.clone(), platform.stopping(), rates)
        .with_watch_buffer(config.watch_buffer.max(1))
        .with_watch_limits(config.max_watchers, config.max_watchers_per_tenant);
    platform.start(MIGRATIONS, move |ready| {
        let wake = notifications::delivery::Wake::default();
        if let Some(settings) = notify.clone() {
            let (db, wake) = (ready.db.clone(), wake.clone());
            ready.spawn(move |stop| notifications::delivery::run(db, settings, wake, stop));
        }
        ready.spawn_consumer(
            ConsumerSpec::new(CONSUMER, subjects::FILTER_ALL, &ready.origin),
            Arc::new(Projection {
                changes,
                notify,
                wake,
            }),
        );
    });
    let max_message = config.common.max_message_bytes;
    platform
        .serve(listener, shutdown, |routes| {
            routes.add_service(
                ViewerServiceServer::new(api)
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(max_message),
            )
        })
        .await
}

/// `gpualloc-viewer notifications`: prints deliveries in `status` (or all)
/// as one line each, and with `requeue` puts parked ones back in the queue.
pub async fn notifications(
    common: &CommonConfig,
    status: &str,
    limit: i64,
    requeue: bool,
) -> anyhow::Result<()> {
    let db = gpualloc_storage::Db::connect(&common.database_url, common.db_options()).await?;
    db.migrate(&[gpualloc_storage::MIGRATIONS, MIGRATIONS])
        .await?;
    if requeue {
        let n = notifications::delivery::requeue(&db).await?;
        println!("requeued {n} parked deliveries");
        return Ok(());
    }
    let status = status.to_uppercase();
    let filter = match status.as_str() {
        "ALL" => None,
        notifications::status::PENDING
        | notifications::status::DELIVERED
        | notifications::status::PARKED => Some(status),
        other => anyhow::bail!("unknown status {other:?}: PENDING, DELIVERED, PARKED or ALL"),
    };
    let rows = notifications::delivery::list(&db, filter, limit.max(1)).await?;
    println!("ID\tSTATUS\tCHANNEL\tTENANT\tALLOCATION\tKIND\tATTEMPTS\tCREATED\tLAST ERROR");
    for d in &rows {
        println!(
            "{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}\t{}",
            d.id,
            d.status,
            d.channel,
            d.tenant,
            d.allocation_id,
            d.kind,
            d.attempts,
            notifications::rfc3339(d.create_time),
            d.last_error
        );
    }
    Ok(())
}
