//! The multi-process harness: several replicas of each service as real OS
//! processes (the `mesh-node` binary), one PostgreSQL database per service
//! shared by its replicas, and a NATS server of the cluster's own, so that
//! a test can SIGKILL any of them and start it again. Each process logs to
//! a file the test prints when it fails.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl, sql_query, sql_types};
use gpualloc_client::{Failover, Policy};
use gpualloc_proto::{
    allocation::v1::allocation_service_client::AllocationServiceClient, resourcepool::v1 as rp,
    resourcepool::v1::resource_pool_service_client::ResourcePoolServiceClient,
    viewer::v1::viewer_service_client::ViewerServiceClient,
};
use gpualloc_testkit::{NatsServer, TestDb, eventually, free_port, unique_name};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::Svc;

impl Svc {
    fn arg(self) -> &'static str {
        match self {
            Svc::Allocation => "allocation",
            Svc::ResourcePool => "resource-pool",
            Svc::Viewer => "viewer",
        }
    }
}

/// One service process.
pub struct Node {
    pub kind: Svc,
    pub replica: usize,
    pub port: u16,
    env: Vec<(String, String)>,
    bin: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

impl Node {
    /// Where this process serves `/metrics`.
    pub fn metrics_addr(&self) -> String {
        self.env
            .iter()
            .find(|(k, _)| k == "GPUALLOC_METRICS_LISTEN")
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        let child = Command::new(&self.bin)
            .arg(self.kind.arg())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn channel(&self) -> Channel {
        Endpoint::from_shared(self.url())
            .unwrap()
            .connect_timeout(Duration::from_secs(1))
            .timeout(Duration::from_secs(10))
            .connect_lazy()
    }

    /// SIGKILL: no shutdown, no flush, as a crash.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM (what Kubernetes sends), then waits until the process has
    /// shut down; returns its exit status.
    pub async fn terminate(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        let pid = child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().ok()?;
        assert!(sent.success(), "kill -TERM {pid} failed");
        tokio::task::spawn_blocking(move || child.wait().ok())
            .await
            .ok()
            .flatten()
    }

    /// Starts a killed process again with the same settings.
    pub fn start(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    pub async fn serving(&self) -> bool {
        let mut client = HealthClient::new(self.channel());
        matches!(
            client.check(HealthCheckRequest { service: String::new() }).await,
            Ok(r) if r.get_ref().status == ServingStatus::Serving as i32
        )
    }

    pub fn name(&self) -> String {
        format!("{}-{}", self.kind.arg(), self.replica)
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Replicas of the three services on PostgreSQL and a NATS of their own.
pub struct Cluster {
    pub nats: NatsServer,
    pub allocation_db: TestDb,
    pub pool_db: TestDb,
    pub viewer_db: TestDb,
    pub nodes: Vec<Node>,
    pub stream: String,
    pub prefix: String,
    logs: tempfile::TempDir,
}

impl Cluster {
    /// Starts `replicas` processes of each service from the `mesh-node`
    /// binary at `bin`; returns once every one is SERVING.
    pub async fn start(bin: &str, replicas: usize) -> Cluster {
        Self::start_with_env(bin, replicas, &[]).await
    }

    /// The same, with extra environment for every process.
    pub async fn start_with_env(bin: &str, replicas: usize, extra: &[(&str, &str)]) -> Cluster {
        Self::start_on(
            bin,
            replicas,
            extra,
            &gpualloc_testkit::postgres_admin_url(),
        )
        .await
    }

    /// The same, with the databases on the PostgreSQL server at
    /// `pg_admin` (one the test may stop and start).
    pub async fn start_on(
        bin: &str,
        replicas: usize,
        extra: &[(&str, &str)],
        pg_admin: &str,
    ) -> Cluster {
        let nats = NatsServer::start();
        let stream = unique_name("C").to_uppercase();
        let prefix = unique_name("c");
        let logs = tempfile::tempdir().unwrap();
        let (allocation_db, pool_db, viewer_db) = (
            TestDb::postgres_on(pg_admin),
            TestDb::postgres_on(pg_admin),
            TestDb::postgres_on(pg_admin),
        );
        let mut nodes = Vec::new();
        let pool_ports: Vec<u16> = (0..replicas).map(|_| free_port()).collect();
        // Every allocation replica knows every pool replica (and fails over
        // among them).
        let pool_urls: Vec<String> = pool_ports
            .iter()
            .map(|p| format!("http://127.0.0.1:{p}"))
            .collect();
        for kind in [Svc::ResourcePool, Svc::Allocation, Svc::Viewer] {
            for (replica, pool_port) in pool_ports.iter().copied().enumerate() {
                let port = match kind {
                    Svc::ResourcePool => pool_port,
                    _ => free_port(),
                };
                let db = match kind {
                    Svc::Allocation => &allocation_db,
                    Svc::ResourcePool => &pool_db,
                    Svc::Viewer => &viewer_db,
                };
                let name = format!("{}-{replica}", kind.arg());
                let env = vec![
                    ("GPUALLOC_LISTEN", format!("127.0.0.1:{port}")),
                    ("GPUALLOC_DATABASE_URL", db.url.clone()),
                    ("GPUALLOC_NATS_URL", nats.url()),
                    ("GPUALLOC_NATS_USER", kind.nats_user().to_owned()),
                    (
                        "GPUALLOC_NATS_PASSWORD",
                        gpualloc_testkit::nats_password(kind.nats_user()),
                    ),
                    ("GPUALLOC_STREAM", stream.clone()),
                    ("GPUALLOC_SUBJECT_PREFIX", prefix.clone()),
                    // Stable across restarts: a restarted replica publishes
                    // the rows it left behind at once.
                    ("GPUALLOC_REPLICA_ID", name.clone()),
                    ("GPUALLOC_DB_POOL_SIZE", "6".into()),
                    // A killed consumer's batch comes back after this.
                    ("GPUALLOC_ACK_WAIT", "5s".into()),
                    ("GPUALLOC_STUCK_AFTER", "5s".into()),
                    ("GPUALLOC_SWEEP_INTERVAL", "500ms".into()),
                    ("GPUALLOC_CHECK_QUOTA_TIMEOUT", "500ms".into()),
                    ("GPUALLOC_RESOURCE_POOL_URL", pool_urls.join(",")),
                    ("GPUALLOC_SHUTDOWN_GRACE", "5s".into()),
                    // Replicas share a host: no default ports.
                    (
                        "GPUALLOC_METRICS_LISTEN",
                        format!("127.0.0.1:{}", free_port()),
                    ),
                    ("GPUALLOC_TEST_PARENT_PID", std::process::id().to_string()),
                    (
                        "GPUALLOC_JWKS",
                        gpualloc_testkit::auth::jwks_path().display().to_string(),
                    ),
                    ("RUST_LOG", "info".into()),
                ];
                let mut node = Node {
                    kind,
                    replica,
                    port,
                    env: env
                        .into_iter()
                        .map(|(k, v)| (k.to_owned(), v))
                        .chain(
                            extra
                                .iter()
                                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
                        )
                        .collect(),
                    bin: PathBuf::from(bin),
                    log: logs.path().join(format!("{name}.log")),
                    child: None,
                };
                node.spawn();
                nodes.push(node);
            }
        }
        let cluster = Cluster {
            nats,
            allocation_db,
            pool_db,
            viewer_db,
            nodes,
            stream,
            prefix,
            logs,
        };
        cluster.wait_serving().await;
        cluster
    }

    pub async fn wait_serving(&self) {
        for node in &self.nodes {
            eventually(
                Duration::from_secs(60),
                &format!("{} SERVING", node.name()),
                || async { node.serving().await.then_some(()) },
            )
            .await;
        }
    }

    pub fn node(&mut self, kind: Svc, replica: usize) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.kind == kind && n.replica == replica)
            .unwrap()
    }

    fn urls(&self, kind: Svc) -> Vec<Channel> {
        self.nodes
            .iter()
            .filter(|n| n.kind == kind)
            .map(Node::channel)
            .collect()
    }

    /// Creates or replaces a pool, as an administrator.
    pub async fn put_pool(&self, id: &str, capacity: rp::Capacity) {
        self.pools()
            .remove(0)
            .put_pool(crate::admin(rp::PutPoolRequest {
                update_mask: None,
                pool: Some(rp::Pool {
                    pool_id: id.into(),
                    capacity: Some(capacity),
                    ..Default::default()
                }),
            }))
            .await
            .unwrap();
    }

    /// Sets a tenant's quota, as an administrator.
    pub async fn set_quota(&self, tenant: &str, limits: rp::Resources) {
        self.pools()
            .remove(0)
            .set_tenant_quota(crate::admin(rp::SetTenantQuotaRequest {
                tenant: tenant.into(),
                limits: Some(limits),
                ..Default::default()
            }))
            .await
            .unwrap();
    }

    /// One client over every replica of `kind`, with the documented
    /// client retry policy (`gpualloc-client`).
    pub fn failover(&self, kind: Svc) -> Failover {
        let urls = self
            .nodes
            .iter()
            .filter(|n| n.kind == kind)
            .map(Node::url)
            .collect::<Vec<_>>();
        Failover::new(urls, Policy::default(), |e| {
            Ok(e.connect_timeout(Duration::from_secs(2)))
        })
        .unwrap()
    }

    pub fn allocations(&self) -> Vec<AllocationServiceClient<Channel>> {
        self.urls(Svc::Allocation)
            .into_iter()
            .map(AllocationServiceClient::new)
            .collect()
    }

    pub fn pools(&self) -> Vec<ResourcePoolServiceClient<Channel>> {
        self.urls(Svc::ResourcePool)
            .into_iter()
            .map(ResourcePoolServiceClient::new)
            .collect()
    }

    pub fn viewers(&self) -> Vec<ViewerServiceClient<Channel>> {
        self.urls(Svc::Viewer)
            .into_iter()
            .map(ViewerServiceClient::new)
            .collect()
    }

    /// The last lines of every process's log (for failure messages).
    pub fn log_tails(&self, lines: usize) -> String {
        let mut out = String::new();
        for node in &self.nodes {
            let text = std::fs::read_to_string(node.log.as_path()).unwrap_or_default();
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("==== {} ====\n", node.name()));
            for l in &all[all.len().saturating_sub(lines)..] {
                out.push_str(l);
                out.push('\n');
            }
        }
        out
    }

    pub fn log_dir(&self) -> &Path {
        self.logs.path()
    }
}

#[derive(QueryableByName, Debug, Clone, PartialEq, Eq)]
pub struct Row {
    #[diesel(sql_type = sql_types::Text)]
    pub id: String,
    #[diesel(sql_type = sql_types::Text)]
    pub state: String,
    #[diesel(sql_type = sql_types::BigInt)]
    pub version: i64,
}

#[derive(QueryableByName)]
struct Count {
    #[diesel(sql_type = sql_types::BigInt)]
    n: i64,
}

/// Runs a query returning [`Row`]s on a PostgreSQL database.
pub async fn rows(url: &str, sql: &str) -> Vec<Row> {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut c = PgConnection::establish(&url).unwrap();
        sql_query(sql).load::<Row>(&mut c).unwrap()
    })
    .await
    .unwrap()
}

/// Runs `SELECT COUNT(*) AS n …` on a PostgreSQL database.
pub async fn pg_count(url: &str, sql: &str) -> i64 {
    let (url, sql) = (url.to_owned(), sql.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut c = PgConnection::establish(&url).unwrap();
        sql_query(sql).get_result::<Count>(&mut c).unwrap().n
    })
    .await
    .unwrap()
}

/// A reservation's demand in the pool class of the row `pr` (PostgreSQL
/// JSON; the test suite runs the multi-process tests on PostgreSQL only).
const POOL_AMOUNT: &str = "CASE
    WHEN pr.class = 'cpu_millis' THEN (r.demand::json->>'cpu_millis')::bigint
    WHEN pr.class = 'memory_mib' THEN (r.demand::json->>'memory_mib')::bigint
    WHEN pr.class = 'storage_gib' THEN (r.demand::json->>'storage_gib')::bigint
    WHEN pr.class = 'gpus.' || r.gpu_model THEN (r.demand::json->>'gpus')::bigint
    ELSE 0 END";

/// The same in the quota class of the row `u`.
const QUOTA_AMOUNT: &str = "CASE
    WHEN u.class = 'cpu_millis' THEN (r.demand::json->>'cpu_millis')::bigint
    WHEN u.class = 'memory_mib' THEN (r.demand::json->>'memory_mib')::bigint
    WHEN u.class = 'storage_gib' THEN (r.demand::json->>'storage_gib')::bigint
    WHEN u.class = 'gpus' THEN (r.demand::json->>'gpus')::bigint
    ELSE 0 END";

/// Invariant I1 audited in one statement each (one consistent snapshot):
/// pool counters equal the sum of the grants and stay within capacity;
/// tenant counters equal the sum of held and granted demand and stay
/// within quota. Returns how many counters break it.
pub async fn audit_i1(pool_db: &str) -> i64 {
    let pools = format!(
        "SELECT COUNT(*) AS n FROM pool_resources pr WHERE pr.used > pr.capacity OR pr.used < 0 \
         OR pr.used <> COALESCE((SELECT SUM({POOL_AMOUNT}) FROM reservations r \
            WHERE r.state = 'GRANTED' AND r.pool_id = pr.pool_id), 0)"
    );
    let tenants = format!(
        "SELECT COUNT(*) AS n FROM tenant_usage u WHERE u.charged > u.quota_limit OR u.granted > u.charged \
         OR u.charged <> COALESCE((SELECT SUM({QUOTA_AMOUNT}) FROM reservations r \
            WHERE r.tenant = u.tenant AND r.state IN ('HELD', 'GRANTED')), 0) \
         OR u.granted <> COALESCE((SELECT SUM({QUOTA_AMOUNT}) FROM reservations r \
            WHERE r.tenant = u.tenant AND r.state = 'GRANTED'), 0)"
    );
    pg_count(pool_db, &pools).await + pg_count(pool_db, &tenants).await
}

#[derive(QueryableByName)]
struct Json {
    #[diesel(sql_type = sql_types::Text)]
    j: String,
}

/// Rows of any query as JSON text (PostgreSQL `row_to_json`), for failure
/// messages.
pub async fn json_rows(url: &str, sql: &str) -> Vec<String> {
    let (url, sql) = (
        url.to_owned(),
        format!("SELECT row_to_json(q)::text AS j FROM ({sql}) q"),
    );
    tokio::task::spawn_blocking(move || {
        let mut c = PgConnection::establish(&url).unwrap();
        sql_query(sql)
            .load::<Json>(&mut c)
            .map(|v| v.into_iter().map(|r| r.j).collect())
            .unwrap_or_else(|e| vec![format!("query failed: {e}")])
    })
    .await
    .unwrap()
}

impl Cluster {
    /// Everything each service stored about one allocation.
    pub async fn explain(&self, id: &str) -> String {
        let mut out = format!("--- {id}\n");
        for (what, url, sql) in [
            (
                "allocation",
                &self.allocation_db.url,
                format!(
                    "SELECT state, version, pool_version, reason, redrives, update_time FROM allocations WHERE allocation_id = '{id}'"
                ),
            ),
            (
                "allocation outbox",
                &self.allocation_db.url,
                format!(
                    "SELECT id, event_id, subject, origin, created_at, published_at FROM outbox WHERE aggregate_id = '{id}' ORDER BY id"
                ),
            ),
            (
                "reservation",
                &self.pool_db.url,
                format!(
                    "SELECT state, version, reason, outcome, update_time FROM reservations WHERE allocation_id = '{id}'"
                ),
            ),
            (
                "pool outbox",
                &self.pool_db.url,
                format!(
                    "SELECT id, event_id, subject, origin, created_at, published_at FROM outbox WHERE aggregate_id = '{id}' ORDER BY id"
                ),
            ),
            (
                "viewer history",
                &self.viewer_db.url,
                format!(
                    "SELECT version, state, event_id, change_time FROM allocation_history WHERE allocation_id = '{id}' ORDER BY version"
                ),
            ),
        ] {
            out.push_str(&format!("{what}:\n"));
            for row in json_rows(url, &sql).await {
                out.push_str(&format!("  {row}\n"));
            }
        }
        out
    }
}
