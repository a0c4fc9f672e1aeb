//! The end-to-end harness: starts the three real services in this process
//! on `127.0.0.1:0`, each with its own fresh database (SQLite or
//! PostgreSQL), against a real NATS JetStream server with a stream and
//! subject prefix of their own, and hands out gRPC clients that carry a
//! caller identity. Tests drive the mesh only through gRPC and check the
//! databases and the stream directly where an outsider would.

#![allow(clippy::unwrap_used)]

use std::{net::SocketAddr, time::Duration};

use gpualloc_platform::CommonConfig;
use gpualloc_proto::{
    allocation::v1::allocation_service_client::AllocationServiceClient,
    resourcepool::v1::resource_pool_service_client::ResourcePoolServiceClient,
    viewer::v1::viewer_service_client::ViewerServiceClient,
};
use gpualloc_testkit::{TestDb, unique_name};
use tokio::{net::TcpListener, sync::oneshot, task::JoinHandle};
use tonic::{
    Request,
    metadata::MetadataValue,
    transport::{Channel, Endpoint},
};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Which database the services use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub fn db(self) -> TestDb {
        match self {
            Backend::Sqlite => TestDb::sqlite(),
            Backend::Postgres => TestDb::postgres(),
        }
    }
}

/// Which service.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Svc {
    Allocation,
    ResourcePool,
    Viewer,
}

impl Svc {
    /// The service's NATS user (its name on the bus).
    pub fn nats_user(self) -> &'static str {
        match self {
            Svc::Allocation => gpualloc_nats_acl::ALLOCATION,
            Svc::ResourcePool => gpualloc_nats_acl::RESOURCE_POOL,
            Svc::Viewer => gpualloc_nats_acl::VIEWER,
        }
    }

    /// `common` with this service's NATS credentials on the test servers,
    /// unless a test chose others.
    pub fn with_nats_user(self, mut common: CommonConfig) -> CommonConfig {
        if common.nats_user.is_none() && !common.nats_url.contains('@') {
            common.nats_user = Some(self.nats_user().to_owned());
            common.nats_password = Some(gpualloc_platform::config::Secret(
                gpualloc_testkit::nats_password(self.nats_user()),
            ));
        }
        common
    }
}

/// `common` as the NATS operator (every right): what operator commands
/// such as `gpualloc-viewer rebuild` run with.
pub fn as_nats_operator(mut common: CommonConfig) -> CommonConfig {
    common.nats_user = Some(gpualloc_nats_acl::OPERATOR.to_owned());
    common.nats_password = Some(gpualloc_platform::config::Secret(
        gpualloc_testkit::nats_password(gpualloc_nats_acl::OPERATOR),
    ));
    common
}

/// Settings tests change beyond [`CommonConfig`].
#[derive(Clone, Debug)]
pub struct Tuning {
    /// Allocation: re-drive sagas waiting on the pool this long.
    pub stuck_after: Duration,
    /// Resource pool: longest pause between sweeps.
    pub sweep_interval: Duration,
    /// Viewer: a watcher's buffer.
    pub watch_buffer: usize,
    /// Viewer: open watch streams in all and per tenant.
    pub max_watchers: (usize, usize),
    /// Viewer: the rate card file.
    pub rate_card: Option<std::path::PathBuf>,
    /// Viewer: the notification settings file.
    pub notify_config: Option<std::path::PathBuf>,
    /// Allocation: the CheckQuota circuit breaker.
    pub breaker: gpualloc_allocation::breaker::BreakerConfig,
    /// Resource pool: how long CheckQuota may answer from memory.
    pub quota_cache_ttl: Duration,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            stuck_after: Duration::from_secs(3),
            sweep_interval: Duration::from_millis(200),
            watch_buffer: gpualloc_viewer::watch::BUFFER,
            max_watchers: (
                gpualloc_viewer::watch::MAX_WATCHERS,
                gpualloc_viewer::watch::MAX_WATCHERS_PER_TENANT,
            ),
            rate_card: None,
            notify_config: None,
            breaker: gpualloc_allocation::breaker::BreakerConfig::default(),
            quota_cache_ttl: Duration::from_millis(100),
        }
    }
}

/// One running service.
pub struct Service {
    pub kind: Svc,
    pub addr: SocketAddr,
    pub common: CommonConfig,
    /// Allocation only: where the resource pool is.
    pub pool_url: String,
    pub tuning: Tuning,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<anyhow::Result<()>>>,
}

impl Service {
    pub async fn spawn(
        kind: Svc,
        common: CommonConfig,
        pool_url: String,
        addr: Option<SocketAddr>,
    ) -> Service {
        Self::spawn_tuned(kind, common, pool_url, addr, Tuning::default()).await
    }

    pub async fn spawn_tuned(
        kind: Svc,
        common: CommonConfig,
        pool_url: String,
        addr: Option<SocketAddr>,
        tuning: Tuning,
    ) -> Service {
        let common = kind.with_nats_user(common);
        let listener =
            TcpListener::bind(addr.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0))))
                .await
                .unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = oneshot::channel::<()>();
        let shutdown = async move {
            let _ = rx.await;
        };
        let task = match kind {
            Svc::Allocation => {
                let mut c = gpualloc_allocation::Config::new(common.clone(), pool_url.clone());
                c.check_quota_timeout = Duration::from_millis(300);
                c.stuck_after = tuning.stuck_after;
                c.breaker_failures = tuning.breaker.failures;
                c.breaker_open = tuning.breaker.open_min;
                c.breaker_open_max = tuning.breaker.open_max;
                c.breaker_probes = tuning.breaker.probes;
                tokio::spawn(gpualloc_allocation::run(c, listener, shutdown))
            }
            Svc::ResourcePool => {
                let mut c = gpualloc_resource_pool::Config::new(common.clone());
                c.sweep_interval = tuning.sweep_interval;
                c.quota_cache_ttl = tuning.quota_cache_ttl;
                tokio::spawn(gpualloc_resource_pool::run(c, listener, shutdown))
            }
            Svc::Viewer => {
                let mut c = gpualloc_viewer::Config::new(common.clone());
                c.watch_buffer = tuning.watch_buffer;
                (c.max_watchers, c.max_watchers_per_tenant) = tuning.max_watchers;
                c.rate_card = tuning.rate_card.clone();
                c.notify_config = tuning.notify_config.clone();
                tokio::spawn(gpualloc_viewer::run(c, listener, shutdown))
            }
        };
        Service {
            kind,
            addr,
            common,
            pool_url,
            tuning,
            stop: Some(tx),
            task: Some(task),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy()
    }

    /// Graceful stop (what SIGTERM does); waits for the service to exit.
    pub async fn stop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.unwrap().unwrap();
        }
    }

    /// Stops and starts again on the same port with the same database.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.start_again().await;
    }

    /// Starts a stopped service again on the same port and database.
    pub async fn start_again(&mut self) {
        *self = Service::spawn_tuned(
            self.kind,
            self.common.clone(),
            self.pool_url.clone(),
            Some(self.addr),
            self.tuning.clone(),
        )
        .await;
    }

    pub async fn health(&self) -> Option<ServingStatus> {
        let mut client = HealthClient::new(self.channel());
        let r = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()?;
        ServingStatus::try_from(r.into_inner().status).ok()
    }

    pub async fn wait_serving(&self) {
        gpualloc_testkit::eventually(
            Duration::from_secs(30),
            &format!("{:?} SERVING", self.kind),
            || async { (self.health().await == Some(ServingStatus::Serving)).then_some(()) },
        )
        .await
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The three services, ready.
pub struct Mesh {
    pub backend: Backend,
    pub allocation: Service,
    pub pool: Service,
    pub viewer: Service,
    pub nats_url: String,
    pub stream: String,
    pub prefix: String,
    pub allocation_db: TestDb,
    pub pool_db: TestDb,
    pub viewer_db: TestDb,
}

impl Mesh {
    /// Starts the mesh against the shared test NATS server.
    pub async fn start(backend: Backend) -> Mesh {
        Self::start_with_nats(backend, gpualloc_testkit::nats_url()).await
    }

    pub async fn start_with_nats(backend: Backend, nats_url: String) -> Mesh {
        Self::start_custom(backend, nats_url, Tuning::default(), |_| {}).await
    }

    /// Starts the mesh against the shared test NATS server with `tuning`.
    pub async fn start_tuned(backend: Backend, tuning: Tuning) -> Mesh {
        Self::start_custom(backend, gpualloc_testkit::nats_url(), tuning, |_| {}).await
    }

    /// Starts the mesh with `tuning` and settings changed by `configure`.
    pub async fn start_custom(
        backend: Backend,
        nats_url: String,
        tuning: Tuning,
        configure: impl Fn(&mut CommonConfig),
    ) -> Mesh {
        let stream = unique_name("T").to_uppercase();
        let prefix = unique_name("t");
        let (allocation_db, pool_db, viewer_db) = (backend.db(), backend.db(), backend.db());
        let common = |db: &TestDb| {
            let mut c = common_config(&db.url, &nats_url).with_stream(&stream, &prefix);
            configure(&mut c);
            c
        };
        let pool = Service::spawn_tuned(
            Svc::ResourcePool,
            common(&pool_db),
            String::new(),
            None,
            tuning.clone(),
        )
        .await;
        let allocation = Service::spawn_tuned(
            Svc::Allocation,
            common(&allocation_db),
            pool.url(),
            None,
            tuning.clone(),
        )
        .await;
        let viewer =
            Service::spawn_tuned(Svc::Viewer, common(&viewer_db), String::new(), None, tuning)
                .await;
        let mesh = Mesh {
            backend,
            allocation,
            pool,
            viewer,
            nats_url,
            stream,
            prefix,
            allocation_db,
            pool_db,
            viewer_db,
        };
        mesh.pool.wait_serving().await;
        mesh.allocation.wait_serving().await;
        mesh.viewer.wait_serving().await;
        mesh
    }

    pub fn allocations(&self) -> AllocationServiceClient<Channel> {
        AllocationServiceClient::new(self.allocation.channel())
    }

    pub fn pools(&self) -> ResourcePoolServiceClient<Channel> {
        ResourcePoolServiceClient::new(self.pool.channel())
    }

    pub fn viewer(&self) -> ViewerServiceClient<Channel> {
        ViewerServiceClient::new(self.viewer.channel())
    }

    /// JetStream as the NATS operator (tests read the stream and forge
    /// events with it).
    pub async fn jetstream(&self) -> async_nats::jetstream::Context {
        let client = gpualloc_testkit::nats_connect_as(&self.nats_url, gpualloc_nats_acl::OPERATOR)
            .await
            .unwrap();
        async_nats::jetstream::new(client)
    }
}

/// A request from an administrator (a bearer token of the test issuer).
pub fn admin<T>(message: T) -> Request<T> {
    bearer(&gpualloc_testkit::auth::admin_token(), message)
}

/// A request from `tenant` (a bearer token of the test issuer).
pub fn tenant<T>(tenant: &str, message: T) -> Request<T> {
    bearer(&gpualloc_testkit::auth::tenant_token(tenant), message)
}

/// A request carrying `token`.
pub fn bearer<T>(token: &str, message: T) -> Request<T> {
    let mut r = Request::new(message);
    r.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}")).unwrap(),
    );
    r
}

/// Settings for a service under test: its database, NATS, and the test
/// issuer's keys.
pub fn common_config(database_url: &str, nats_url: &str) -> CommonConfig {
    let mut c = CommonConfig::new(database_url, nats_url);
    c.auth.jwks = Some(gpualloc_testkit::auth::jwks_path().display().to_string());
    c
}

pub mod cluster;
pub mod fixtures;
pub mod raw;
