//! The allocation service: the front door and the source of truth for
//! allocation state. `CreateAllocation` validates, asks the resource pool
//! synchronously (advisory; a pool that does not answer does not stop the
//! request), stores the allocation with its events in one transaction, and
//! the saga continues over JetStream: this service consumes the pool's
//! decisions and moves the state machine, emitting `AllocationStateChanged`
//! for the viewer on every transition.

use std::{future::Future, net::SocketAddr, sync::Arc, time::Duration};

use gpualloc_platform::{CommonConfig, Platform, config::parse_duration, telemetry::LogFormat};
use gpualloc_proto::allocation::v1::allocation_service_server::AllocationServiceServer;
use gpualloc_saga::{ConsumerSpec, subjects};
use gpualloc_storage::Migration;
use tokio::net::TcpListener;
use tonic::server::NamedService;

pub mod breaker;
mod error;
mod handler;
pub mod machine;
mod metrics;
pub mod ops;
mod quota;
mod reconciler;
mod schema;
mod service;
pub mod store;
pub mod wire;

pub use error::Error;
pub use handler::PoolDecisions;
pub use quota::{Advice, QuotaClient};
pub use service::AllocationApi;

/// The fully-qualified gRPC service name (also its health-check name).
pub const SERVICE_NAME: &str = <AllocationServiceServer<AllocationApi> as NamedService>::NAME;

/// Durable consumer name, shared by all replicas.
pub const CONSUMER: &str = "allocation";

/// Where `/metrics` is served unless `GPUALLOC_METRICS_LISTEN` says otherwise.
pub const METRICS_PORT: u16 = 9091;

pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: "allocation_0001_allocations",
        up: include_str!("../migrations/0001_allocations.sql"),
    },
    Migration {
        version: "allocation_0002_display_name",
        up: include_str!("../migrations/0002_display_name.sql"),
    },
];

/// Settings of the allocation service.
#[derive(clap::Parser, Clone, Debug)]
#[command(
    name = "gpualloc-allocation",
    version,
    about = "gpualloc allocation service"
)]
pub struct Config {
    /// Address to serve gRPC on.
    #[arg(long, env = "GPUALLOC_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    #[command(flatten)]
    pub common: CommonConfig,

    /// The resource-pool service, for the synchronous CheckQuota; several
    /// replicas comma-separated (calls rotate and fail over among them).
    #[arg(
        long,
        env = "GPUALLOC_RESOURCE_POOL_URL",
        default_value = "http://127.0.0.1:50052"
    )]
    pub resource_pool_url: String,

    /// CA certificate (PEM) to verify an `https://` resource pool with.
    #[arg(long, env = "GPUALLOC_RESOURCE_POOL_TLS_CA")]
    pub resource_pool_tls_ca: Option<std::path::PathBuf>,

    /// Client certificate and key (PEM) for a resource pool that requires
    /// them (mutual TLS).
    #[arg(
        long,
        env = "GPUALLOC_RESOURCE_POOL_TLS_CERT",
        requires = "resource_pool_tls_key"
    )]
    pub resource_pool_tls_cert: Option<std::path::PathBuf>,

    #[arg(
        long,
        env = "GPUALLOC_RESOURCE_POOL_TLS_KEY",
        requires = "resource_pool_tls_cert"
    )]
    pub resource_pool_tls_key: Option<std::path::PathBuf>,

    /// Deadline of the synchronous CheckQuota; past it the request is
    /// accepted as PENDING.
    #[arg(long, env = "GPUALLOC_CHECK_QUOTA_TIMEOUT", default_value = "500ms", value_parser = parse_duration)]
    pub check_quota_timeout: Duration,

    /// A saga step waiting on the pool (PENDING, CANCELLING) longer than
    /// this is re-driven by the reconciler; further re-drives back off.
    #[arg(long, env = "GPUALLOC_STUCK_AFTER", default_value = "30s", value_parser = parse_duration)]
    pub stuck_after: Duration,

    /// Consecutive CheckQuota failures (transport errors, UNAVAILABLE,
    /// deadline) that open the circuit breaker.
    #[arg(long, env = "GPUALLOC_BREAKER_FAILURES", default_value_t = 5)]
    pub breaker_failures: u32,

    /// How long the breaker stays open the first time; it doubles (with
    /// jitter) while probes keep failing, up to `breaker_open_max`.
    #[arg(long, env = "GPUALLOC_BREAKER_OPEN", default_value = "5s", value_parser = parse_duration)]
    pub breaker_open: Duration,

    #[arg(long, env = "GPUALLOC_BREAKER_OPEN_MAX", default_value = "60s", value_parser = parse_duration)]
    pub breaker_open_max: Duration,

    /// Calls let through at once while half-open.
    #[arg(long, env = "GPUALLOC_BREAKER_PROBES", default_value_t = 1)]
    pub breaker_probes: usize,

    /// Longest pause between two re-drives of the same stuck step.
    #[arg(long, env = "GPUALLOC_REDRIVE_MAX_BACKOFF", default_value = "10m", value_parser = parse_duration)]
    pub redrive_max_backoff: Duration,

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
    pub fn new(common: CommonConfig, resource_pool_url: impl Into<String>) -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 50051)),
            common,
            resource_pool_url: resource_pool_url.into(),
            resource_pool_tls_ca: None,
            resource_pool_tls_cert: None,
            resource_pool_tls_key: None,
            check_quota_timeout: service::DEFAULT_CHECK_TIMEOUT,
            stuck_after: Duration::from_secs(30),
            redrive_max_backoff: Duration::from_secs(600),
            breaker_failures: 5,
            breaker_open: Duration::from_secs(5),
            breaker_open_max: Duration::from_secs(60),
            breaker_probes: 1,
            log_format: LogFormat::Text,
            command: None,
        }
    }
}

/// TLS to the resource pool, when its URL is `https://`.
fn quota_tls(config: &Config) -> anyhow::Result<Option<tonic::transport::ClientTlsConfig>> {
    if !config.resource_pool_url.starts_with("https://") {
        return Ok(None);
    }
    let read = |p: &std::path::Path| {
        std::fs::read(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))
    };
    let mut tls = tonic::transport::ClientTlsConfig::new();
    if let Some(ca) = &config.resource_pool_tls_ca {
        tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
    }
    if let (Some(cert), Some(key)) = (
        &config.resource_pool_tls_cert,
        &config.resource_pool_tls_key,
    ) {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            read(cert)?,
            read(key)?,
        ));
    }
    Ok(Some(tls))
}

/// Runs the service on `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    metrics::register();
    let platform = Platform::new(CONSUMER, SERVICE_NAME, METRICS_PORT, config.common.clone());
    let breaker = breaker::BreakerConfig {
        failures: config.breaker_failures,
        open_min: config.breaker_open,
        open_max: config.breaker_open_max,
        probes: config.breaker_probes,
    };
    let quota = QuotaClient::new(
        &config.resource_pool_url,
        config.check_quota_timeout,
        breaker,
        quota_tls(&config)?,
    )?;
    let api = AllocationApi::new(
        platform.db(),
        platform.relay(),
        platform.origin().to_owned(),
        quota,
    );
    let policy = ops::RedrivePolicy {
        stuck_after: config.stuck_after.as_micros() as i64,
        max_backoff: config.redrive_max_backoff.as_micros() as i64,
    };
    platform.start(MIGRATIONS, move |ready| {
        ready.spawn_consumer(
            ConsumerSpec::new(CONSUMER, subjects::FILTER_RESERVATION_SAGA, &ready.origin),
            Arc::new(PoolDecisions),
        );
        let outbox = ready.outbox.clone();
        ready.spawn(move |cancel| reconciler::run(outbox, policy, cancel));
    });
    let max_message = config.common.max_message_bytes;
    platform
        .serve(listener, shutdown, |routes| {
            routes.add_service(
                AllocationServiceServer::new(api)
                    .max_decoding_message_size(max_message)
                    .max_encoding_message_size(max_message),
            )
        })
        .await
}
