//! The resource-pool service: owns pools (capacity), tenant quotas,
//! reservations and the hold queue, and is the authority on capacity. It
//! consumes `AllocationRequested` and `AllocationCancelled` from JetStream
//! and decides every placement in one transaction (grant on exactly one
//! pool, hold, or reject), releases leases when they end, and admits held
//! requests whenever capacity frees up. Its `CheckQuota` RPC is the
//! read-only dry run the allocation service calls synchronously.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use gpualloc_platform::{CommonConfig, Platform, config::parse_duration, telemetry::LogFormat};
use gpualloc_proto::resourcepool::v1::resource_pool_service_server::ResourcePoolServiceServer;
use gpualloc_saga::{ConsumerSpec, subjects};
use gpualloc_storage::Migration;
use tokio::net::TcpListener;
use tonic::server::NamedService;

pub mod admin;
pub mod engine;
mod error;
mod handler;
pub mod mask;
mod metrics;
mod quota_cache;
pub mod saga;
mod schema;
mod service;
pub mod store;
mod sweeper;

pub use error::Error;
pub use handler::AllocationEvents;
pub use service::PoolService;

/// The fully-qualified gRPC service name (also its health-check name).
pub const SERVICE_NAME: &str = <ResourcePoolServiceServer<PoolService> as NamedService>::NAME;

/// Durable consumer name, shared by all replicas.
pub const CONSUMER: &str = "resource-pool";

/// Where `/metrics` is served unless `GPUALLOC_METRICS_LISTEN` says otherwise.
pub const METRICS_PORT: u16 = 9092;

/// This service's migrations (after the shared outbox/inbox ones).
pub const MIGRATIONS: &[Migration] = &[Migration {
    version: "resource_pool_0001_pools_quotas_reservations",
    up: include_str!("../migrations/0001_pools_quotas_reservations.sql"),
}];

/// Settings of the resource-pool service.
#[derive(clap::Parser, Clone, Debug)]
#[command(
    name = "gpualloc-resource-pool",
    version,
    about = "gpualloc resource-pool service"
)]
pub struct Config {
    /// Address to serve gRPC on.
    #[arg(long, env = "GPUALLOC_LISTEN", default_value = "127.0.0.1:50052")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub common: CommonConfig,

    /// Longest time between two sweeps for ended leases and overdue holds
    /// (the sweeper also wakes at the next known deadline).
    #[arg(long, env = "GPUALLOC_SWEEP_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub sweep_interval: Duration,

    /// How long `CheckQuota` may answer from counters it read earlier. Its
    /// own replica's writes show at once; other replicas' writes show
    /// within this time. `0s` reads the database on every check. The
    /// placement in the saga always decides on current counters.
    #[arg(long, env = "GPUALLOC_QUOTA_CACHE_TTL", default_value = "100ms", value_parser = parse_duration)]
    pub quota_cache_ttl: Duration,

    /// Log format.
    #[arg(long, env = "GPUALLOC_LOG_FORMAT", value_enum, default_value_t)]
    pub log_format: LogFormat,

    /// What to do instead of serving.
    #[command(subcommand)]
    pub command: Option<Command>,
}

/// Operator commands.
#[derive(clap::Subcommand, Clone, Debug)]
pub enum Command {
    /// List outbox rows set aside after failing to publish; requeue them.
    Outbox(gpualloc_platform::outbox_cmd::OutboxArgs),
}

impl Config {
    pub fn new(common: CommonConfig) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50052)),
            common,
            sweep_interval: Duration::from_secs(1),
            quota_cache_ttl: Duration::from_millis(100),
            log_format: LogFormat::Text,
            command: None,
        }
    }
}

/// Runs the service on `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    metrics::register();
    let platform = Platform::new(CONSUMER, SERVICE_NAME, METRICS_PORT, config.common.clone());
    let service = PoolService::new(
        platform.db(),
        platform.relay(),
        platform.origin().to_owned(),
        config.quota_cache_ttl,
    );
    let sweep_interval = config.sweep_interval;
    platform.start(MIGRATIONS, move |ready| {
        ready.spawn_consumer(
            ConsumerSpec::new(CONSUMER, subjects::FILTER_ALLOCATION_SAGA, &ready.origin),
            Arc::new(AllocationEvents),
        );
        let outbox = ready.outbox.clone();
        ready.spawn(move |cancel| sweeper::run(outbox, sweep_interval, cancel));
        let db = ready.db.clone();
        ready.spawn(move |cancel| sample_capacity(db, cancel));
    });
    let max_message = config.common.max_message_bytes;
    platform
        .serve(listener, shutdown, |routes| {
            routes.add_service(
                ResourcePoolServiceServer::new(service)
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(max_message),
            )
        })
        .await
}

/// Keeps the capacity metrics current: the hold queue, every pool's
/// capacity, usage and free room, every tenant's quota and usage, per
/// class. Every replica reads the same shared tables, so every replica
/// reports the same values (aggregate with `max`, not `sum`).
async fn sample_capacity(db: gpualloc_storage::Db, cancel: tokio_util::sync::CancellationToken) {
    use diesel::prelude::*;
    use gpualloc_storage::Native as _;
    use gpualloc_telemetry::{labels, replace_gauges};
    let m = &*metrics::METRICS;
    let mut previous: [Vec<gpualloc_telemetry::Labels>; 6] = Default::default();
    loop {
        let snapshot = db
            .read(|c| {
                let depth = schema::reservations::table
                    .filter(schema::reservations::state.eq(store::ReservationState::Held.as_str()))
                    .count()
                    .get_result::<i64>(c)?;
                let pools = store::load_pools(c)?;
                let tenants: Vec<(String, String, i64, i64, i64)> = schema::tenant_usage::table
                    .select((
                        schema::tenant_usage::tenant,
                        schema::tenant_usage::class,
                        schema::tenant_usage::quota_limit,
                        schema::tenant_usage::granted,
                        schema::tenant_usage::charged,
                    ))
                    .load_native(c)?;
                Ok::<_, Error>((depth, pools, tenants))
            })
            .await;
        match snapshot {
            Ok((depth, pools, tenants)) => {
                m.hold_queue_depth.set(depth);
                let (mut capacity, mut usage, mut free) = (Vec::new(), Vec::new(), Vec::new());
                for p in &pools {
                    for (class, cap) in &p.state.capacity {
                        let l = labels([("pool", &p.row.pool_id), ("class", &class.to_string())]);
                        let used = p.state.used.get(class).copied().unwrap_or(0);
                        capacity.push((l.clone(), *cap));
                        usage.push((l.clone(), used));
                        free.push((l, p.state.free(class).max(0)));
                    }
                }
                let (mut quota, mut granted, mut charged) = (Vec::new(), Vec::new(), Vec::new());
                for (tenant, class, limit, g, ch) in &tenants {
                    let l = labels([("tenant", tenant), ("class", class)]);
                    quota.push((l.clone(), *limit));
                    granted.push((l.clone(), *g));
                    charged.push((l, *ch));
                }
                let [p0, p1, p2, p3, p4, p5] = &mut previous;
                replace_gauges(&m.pool_capacity, p0, capacity);
                replace_gauges(&m.pool_usage, p1, usage);
                replace_gauges(&m.pool_free, p2, free);
                replace_gauges(&m.tenant_quota, p3, quota);
                replace_gauges(&m.tenant_usage, p4, granted);
                replace_gauges(&m.tenant_charged, p5, charged);
            }
            Err(e) => tracing::debug!(error = %e, "capacity metrics not sampled"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
        }
    }
}
