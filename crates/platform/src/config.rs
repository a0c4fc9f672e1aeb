//! `CommonConfig`: the settings every service takes from flags or
//! `GPUALLOC_*` variables (database, NATS, stream, shutdown, protection,
//! auth, TLS, metrics), and how they turn into the lower crates' configs.

use std::time::Duration;

use gpualloc_saga::BusConfig;
use gpualloc_storage::DbOptions;

/// A secret setting: never shown by `Debug`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_owned()))
    }
}

/// Settings every service takes, from flags or `GPUALLOC_*` environment
/// variables.
#[derive(clap::Args, Clone)]
pub struct CommonConfig {
    /// Database: `postgres://…` or a SQLite file (`sqlite://path`).
    #[arg(long, env = "GPUALLOC_DATABASE_URL")]
    pub database_url: String,

    /// Create the PostgreSQL database named in the URL if it does not
    /// exist (development convenience; production provisions it).
    #[arg(long, env = "GPUALLOC_CREATE_DATABASE")]
    pub create_database: bool,

    /// Size of the database connection pool.
    #[arg(long, env = "GPUALLOC_DB_POOL_SIZE", default_value_t = 8)]
    pub db_pool_size: usize,

    /// NATS server URL(s), comma-separated.
    #[arg(
        long,
        env = "GPUALLOC_NATS_URL",
        default_value = "nats://127.0.0.1:4222"
    )]
    pub nats_url: String,

    /// The service's NATS user (the server refuses anonymous clients; see
    /// docs/security.md for what each user may publish).
    #[arg(long, env = "GPUALLOC_NATS_USER")]
    pub nats_user: Option<String>,

    #[arg(long, env = "GPUALLOC_NATS_PASSWORD", hide_env_values = true)]
    pub nats_password: Option<Secret>,

    /// A file with the user's nkey seed, instead of a password.
    #[arg(long, env = "GPUALLOC_NATS_NKEY_SEED_FILE")]
    pub nats_nkey_seed_file: Option<std::path::PathBuf>,

    /// A NATS `.creds` file (operator/JWT mode), instead of a password.
    #[arg(long, env = "GPUALLOC_NATS_CREDS")]
    pub nats_creds: Option<std::path::PathBuf>,

    /// CA certificate(s) to verify the NATS server's certificate with (PEM).
    #[arg(long, env = "GPUALLOC_NATS_TLS_CA")]
    pub nats_tls_ca: Option<std::path::PathBuf>,

    /// Client certificate and key for NATS servers that verify clients.
    #[arg(long, env = "GPUALLOC_NATS_TLS_CERT")]
    pub nats_tls_cert: Option<std::path::PathBuf>,

    #[arg(long, env = "GPUALLOC_NATS_TLS_KEY")]
    pub nats_tls_key: Option<std::path::PathBuf>,

    /// Refuse to talk to NATS without TLS.
    #[arg(long, env = "GPUALLOC_NATS_TLS_REQUIRED")]
    pub nats_tls_required: bool,

    /// JetStream stream holding the saga's events.
    #[arg(long, env = "GPUALLOC_STREAM", default_value = "GPUALLOC")]
    pub stream: String,

    /// Subject prefix of the saga's events.
    #[arg(long, env = "GPUALLOC_SUBJECT_PREFIX", default_value = "gpualloc")]
    pub subject_prefix: String,

    /// Replicas of the JetStream stream (3 on a NATS cluster).
    #[arg(long, env = "GPUALLOC_STREAM_REPLICAS", default_value_t = 1)]
    pub stream_replicas: usize,

    /// This replica's id (defaults to a random one per start). Outbox rows
    /// carry it so each replica publishes its own rows first.
    #[arg(long, env = "GPUALLOC_REPLICA_ID")]
    pub replica_id: Option<String>,

    /// JetStream de-duplication window of the stream (by `Nats-Msg-Id`);
    /// beyond it the consumers' inboxes catch duplicates.
    #[arg(long, env = "GPUALLOC_DUPLICATE_WINDOW", default_value = "2m", value_parser = parse_duration)]
    pub duplicate_window: Duration,

    /// How long a consumer may take to ack a delivered event before
    /// JetStream delivers it again (to this or another replica).
    #[arg(long, env = "GPUALLOC_ACK_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub ack_wait: Duration,

    /// Longest a shutdown waits for in-flight RPCs, consumers and the outbox.
    #[arg(long, env = "GPUALLOC_SHUTDOWN_GRACE", default_value = "30s", value_parser = parse_duration)]
    pub shutdown_grace: Duration,

    /// Time between reporting NOT_SERVING and refusing new RPCs, so that
    /// load balancers stop sending first (set to a few seconds on
    /// Kubernetes).
    #[arg(long, env = "GPUALLOC_SHUTDOWN_DELAY", default_value = "0s", value_parser = parse_duration)]
    pub shutdown_delay: Duration,

    /// Longest a request may run; past it the client gets
    /// DEADLINE_EXCEEDED (a shorter `grpc-timeout` from the caller wins).
    #[arg(long, env = "GPUALLOC_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub request_timeout: Duration,

    /// Requests handled at once; beyond it requests are refused with
    /// RESOURCE_EXHAUSTED and a retry pushback (health checks excepted).
    #[arg(long, env = "GPUALLOC_MAX_CONCURRENT_REQUESTS", default_value_t = 512)]
    pub max_concurrent_requests: usize,

    /// Requests per second per tenant (0: no limit).
    #[arg(long, env = "GPUALLOC_TENANT_RATE_LIMIT", default_value_t = 0.0)]
    pub tenant_rate_limit: f64,

    /// Burst per tenant above the rate (0: one second's worth).
    #[arg(long, env = "GPUALLOC_TENANT_BURST", default_value_t = 0)]
    pub tenant_burst: u32,

    /// Largest gRPC message accepted or sent.
    #[arg(long, env = "GPUALLOC_MAX_MESSAGE_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_message_bytes: usize,

    /// Prometheus metrics address (`host:port`, or `off`); defaults to
    /// 127.0.0.1:9091 (allocation), 9092 (resource-pool), 9093 (viewer).
    #[arg(long, env = "GPUALLOC_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,

    /// Serve gRPC over TLS with this certificate chain (PEM), for
    /// deployments without a mesh; with Istio, leave TLS to the sidecars.
    #[arg(long, env = "GPUALLOC_TLS_CERT", requires = "tls_key")]
    pub tls_cert: Option<std::path::PathBuf>,

    /// The private key of `tls_cert` (PEM).
    #[arg(long, env = "GPUALLOC_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<std::path::PathBuf>,

    /// Require client certificates signed by this CA (PEM): mutual TLS.
    #[arg(long, env = "GPUALLOC_TLS_CLIENT_CA", requires = "tls_cert")]
    pub tls_client_ca: Option<std::path::PathBuf>,

    /// Who the callers are (see `crate::auth`).
    #[command(flatten)]
    pub auth: crate::auth::AuthConfig,
}

impl std::fmt::Debug for CommonConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // URLs carry credentials: shown redacted.
        f.debug_struct("CommonConfig")
            .field(
                "database_url",
                &gpualloc_storage::redact_url(&self.database_url),
            )
            .field("nats_url", &gpualloc_storage::redact_url(&self.nats_url))
            .field("nats_user", &self.nats_user)
            .field("nats_password", &self.nats_password)
            .field("stream", &self.stream)
            .field("subject_prefix", &self.subject_prefix)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

impl CommonConfig {
    /// Defaults for everything but the two URLs (tests and embedding).
    pub fn new(database_url: impl Into<String>, nats_url: impl Into<String>) -> Self {
        Self {
            database_url: database_url.into(),
            create_database: false,
            db_pool_size: 8,
            nats_url: nats_url.into(),
            nats_user: None,
            nats_password: None,
            nats_nkey_seed_file: None,
            nats_creds: None,
            nats_tls_ca: None,
            nats_tls_cert: None,
            nats_tls_key: None,
            nats_tls_required: false,
            stream: "GPUALLOC".into(),
            subject_prefix: "gpualloc".into(),
            stream_replicas: 1,
            replica_id: None,
            duplicate_window: Duration::from_secs(120),
            ack_wait: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
            shutdown_delay: Duration::ZERO,
            request_timeout: Duration::from_secs(10),
            max_concurrent_requests: 512,
            tenant_rate_limit: 0.0,
            tenant_burst: 0,
            max_message_bytes: 4 * 1024 * 1024,
            // Several services share a process in tests: no fixed ports.
            metrics_listen: Some("off".into()),
            auth: crate::auth::AuthConfig::default(),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
        }
    }

    /// The server's TLS settings, when it serves TLS.
    pub fn server_tls(&self) -> anyhow::Result<Option<tonic::transport::ServerTlsConfig>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let read = |p: &std::path::Path| {
            std::fs::read(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display()))
        };
        let mut tls = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(read(cert)?, read(key)?),
        );
        if let Some(ca) = &self.tls_client_ca {
            tls = tls.client_ca_root(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        Ok(Some(tls))
    }

    /// What the server stack enforces.
    pub fn protection(&self) -> crate::layers::Protection {
        let burst = if self.tenant_burst > 0 {
            self.tenant_burst
        } else {
            self.tenant_rate_limit.ceil().max(1.0) as u32
        };
        crate::layers::Protection {
            request_timeout: self.request_timeout,
            max_concurrent: self.max_concurrent_requests,
            tenant_rate: (self.tenant_rate_limit > 0.0).then_some((self.tenant_rate_limit, burst)),
        }
    }

    /// Where to serve metrics: the setting, or `default_port` on loopback;
    /// `None` when turned off.
    pub fn metrics_addr(&self, default_port: u16) -> Result<Option<std::net::SocketAddr>, String> {
        match self.metrics_listen.as_deref().map(str::trim) {
            None | Some("") => Ok(Some(std::net::SocketAddr::from((
                [127, 0, 0, 1],
                default_port,
            )))),
            Some("off") => Ok(None),
            Some(a) => a
                .parse()
                .map(Some)
                .map_err(|e| format!("GPUALLOC_METRICS_LISTEN {a:?}: {e}")),
        }
    }

    /// Uses another stream and subject prefix (tests isolate themselves so).
    pub fn with_stream(mut self, stream: &str, prefix: &str) -> Self {
        self.stream = stream.into();
        self.subject_prefix = prefix.into();
        self
    }

    pub fn bus(&self) -> BusConfig {
        let mut b = BusConfig::new(self.nats_url.clone());
        b.stream = self.stream.clone();
        b.prefix = self.subject_prefix.clone();
        b.stream_replicas = self.stream_replicas;
        b.duplicate_window = self.duplicate_window;
        b.auth = gpualloc_saga::NatsAuth {
            user: self.nats_user.clone(),
            password: self.nats_password.as_ref().map(|s| s.0.clone()),
            nkey_seed_file: self.nats_nkey_seed_file.clone(),
            creds_file: self.nats_creds.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
            tls_required: self.nats_tls_required,
        };
        b
    }

    pub fn db_options(&self) -> DbOptions {
        DbOptions {
            pool_size: self.db_pool_size,
            ..DbOptions::default()
        }
    }
}

/// Parses `500ms`, `30s`, `5m`, `2h` or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !c.is_ascii_digit() && c != '.') {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 500ms, 30s, 5m or 2h"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("unknown unit in {s:?}; use ms, s, m or h")),
    };
    if !(0.0..=1e9).contains(&secs) {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("7"), Ok(Duration::from_secs(7)));
        assert!(parse_duration("x").is_err());
        assert!(parse_duration("5d").is_err());
    }
}
