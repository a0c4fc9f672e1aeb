//! The mesh under test: the three services as separate processes of this
//! binary (`gpualloc-bench node <service>`, exactly what their own binaries
//! run), each with its own SQLite file, against a throwaway NATS server.
//! Separate processes so that each one's memory and CPU can be measured.

use std::{
    path::Path,
    process::{Child, Command, Stdio},
    time::Duration,
};

use clap::Parser;
use gpualloc_testkit::{NatsServer, free_port};
use tonic::transport::{Channel, Endpoint};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

/// Runs one service in this process (the `node` subcommand).
pub async fn node(service: &str, args: Vec<String>) -> anyhow::Result<()> {
    let mut argv = vec![format!("gpualloc-{service}")];
    argv.extend(args);
    let shutdown = gpualloc_platform::shutdown::signal();
    match service {
        "allocation" => {
            let c = gpualloc_allocation::Config::parse_from(argv);
            let t = gpualloc_platform::telemetry::init(c.log_format, "gpualloc-allocation");
            let l = tokio::net::TcpListener::bind(c.listen).await?;
            let r = gpualloc_allocation::run(c, l, shutdown).await;
            t.shutdown();
            r
        }
        "resource-pool" => {
            let c = gpualloc_resource_pool::Config::parse_from(argv);
            let t = gpualloc_platform::telemetry::init(c.log_format, "gpualloc-resource-pool");
            let l = tokio::net::TcpListener::bind(c.listen).await?;
            let r = gpualloc_resource_pool::run(c, l, shutdown).await;
            t.shutdown();
            r
        }
        "floor" => {
            let c = gpualloc_allocation::Config::parse_from(argv);
            let t = gpualloc_platform::telemetry::init(c.log_format, "gpualloc-bench-floor");
            let l = tokio::net::TcpListener::bind(c.listen).await?;
            let r = crate::floor::run(c, l, shutdown).await;
            t.shutdown();
            r
        }
        "viewer" => {
            let c = gpualloc_viewer::Config::parse_from(argv);
            let t = gpualloc_platform::telemetry::init(c.log_format, "gpualloc-viewer");
            let l = tokio::net::TcpListener::bind(c.listen).await?;
            let r = gpualloc_viewer::run(c, l, shutdown).await;
            t.shutdown();
            r
        }
        other => anyhow::bail!("unknown service {other:?}"),
    }
}

pub const SERVICES: [&str; 3] = ["resource-pool", "allocation", "viewer"];

pub struct Proc {
    pub name: &'static str,
    pub port: u16,
    pub metrics_port: u16,
    /// Its database: a SQLite file's URL, or a PostgreSQL database made
    /// for this mesh.
    pub db_url: String,
    child: Child,
}

/// The PostgreSQL server meshes use instead of SQLite files (an URL with
/// the right to create databases), while set: `run --database` sets it for
/// its second pass over the scenarios.
static POSTGRES: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

pub fn use_postgres(admin_url: Option<String>) {
    *POSTGRES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = admin_url;
}

pub fn postgres() -> Option<String> {
    POSTGRES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// `url` naming database `name` instead of its own.
pub fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let server = match base.find("://") {
        Some(scheme) => match base[scheme + 3..].find('/') {
            Some(slash) => &base[..scheme + 3 + slash],
            None => base,
        },
        None => base,
    };
    match query {
        Some(q) => format!("{server}/{name}?{q}"),
        None => format!("{server}/{name}"),
    }
}

/// A fresh PostgreSQL database on `admin`'s server; its URL.
pub fn create_database(admin: &str, name: &str) -> anyhow::Result<String> {
    use diesel::{Connection, PgConnection, RunQueryDsl};
    let mut c = PgConnection::establish(admin)?;
    diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{name}\"")).execute(&mut c)?;
    diesel::sql_query(format!("CREATE DATABASE \"{name}\"")).execute(&mut c)?;
    Ok(with_database(admin, name))
}

pub fn drop_database(admin: &str, name: &str) {
    use diesel::{Connection, PgConnection, RunQueryDsl};
    if let Ok(mut c) = PgConnection::establish(admin) {
        let _ = diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
            .execute(&mut c);
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// Peak resident memory (KiB) and CPU seconds of a process so far.
#[derive(Clone, Copy, Debug, Default)]
pub struct Usage {
    pub peak_rss_kib: u64,
    pub cpu_seconds: f64,
}

pub fn usage(pid: u32) -> Usage {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let peak_rss_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0);
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may contain spaces): utime and
    // stime are the 12th and 13th after it, in clock ticks (100 Hz).
    let cpu_seconds = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            let f: Vec<&str> = rest.split_whitespace().collect();
            let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
            (ticks(11) + ticks(12)) as f64 / 100.0
        })
        .unwrap_or(0.0);
    Usage {
        peak_rss_kib,
        cpu_seconds,
    }
}

/// Resets a process's peak resident memory (`VmHWM`) to what it holds now,
/// so that the next [`usage`] reports the peak of what follows.
pub fn reset_peak_rss(pid: u32) -> std::io::Result<()> {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5")
}

pub struct Mesh {
    pub nats: NatsServer,
    pub dir: tempfile::TempDir,
    pub procs: Vec<Proc>,
    /// PostgreSQL databases made for this mesh (server URL, names), dropped
    /// with it.
    databases: Option<(String, Vec<String>)>,
}

impl Mesh {
    pub async fn start(exe: &Path) -> anyhow::Result<Mesh> {
        Mesh::start_services(exe, &SERVICES).await
    }

    /// `services` only (each a `node` name), against a NATS server of
    /// their own; the first is the one the others call for quota checks.
    pub async fn start_services(exe: &Path, services: &[&'static str]) -> anyhow::Result<Mesh> {
        let nats = NatsServer::start();
        let dir = tempfile::tempdir()?;
        let ports: Vec<u16> = services.iter().map(|_| free_port()).collect();
        let pool_url = format!("http://127.0.0.1:{}", ports[0]);
        let mut procs = Vec::new();
        let postgres = postgres();
        let mut databases = Vec::new();
        for (name, port) in services.iter().zip(&ports) {
            // The floor stands in for the allocation service, on the bus too.
            let user = if *name == "floor" { "allocation" } else { name };
            let db_url = match &postgres {
                Some(admin) => {
                    let db = format!(
                        "gpualloc_bench_{}_{}_{}",
                        std::process::id(),
                        port,
                        name.replace('-', "_")
                    );
                    let url = create_database(admin, &db)?;
                    databases.push(db);
                    url
                }
                None => format!(
                    "sqlite://{}",
                    dir.path().join(format!("{name}.db")).display()
                ),
            };
            let metrics_port = free_port();
            let log = std::fs::File::create(dir.path().join(format!("{name}.log")))?;
            let child = Command::new(exe)
                .args(["node", name])
                .env("GPUALLOC_LISTEN", format!("127.0.0.1:{port}"))
                .env("GPUALLOC_DATABASE_URL", &db_url)
                .env("GPUALLOC_NATS_URL", nats.url())
                // The service names are their NATS users.
                .env("GPUALLOC_NATS_USER", user)
                .env(
                    "GPUALLOC_NATS_PASSWORD",
                    gpualloc_testkit::nats_password(user),
                )
                .env(
                    "GPUALLOC_JWKS",
                    gpualloc_testkit::auth::jwks_path().display().to_string(),
                )
                .env("GPUALLOC_RESOURCE_POOL_URL", &pool_url)
                .env(
                    "GPUALLOC_METRICS_LISTEN",
                    format!("127.0.0.1:{metrics_port}"),
                )
                // The bench measures capacity, not the shedding.
                .env("GPUALLOC_MAX_CONCURRENT_REQUESTS", "100000")
                .env("RUST_LOG", "warn")
                .stdin(Stdio::null())
                .stdout(log.try_clone()?)
                .stderr(log)
                .spawn()?;
            procs.push(Proc {
                name,
                port: *port,
                metrics_port,
                db_url,
                child,
            });
        }
        let mut mesh = Mesh {
            nats,
            dir,
            procs,
            databases: postgres.map(|admin| (admin, databases)),
        };
        for i in 0..mesh.procs.len() {
            let name = mesh.procs[i].name;
            let channel = mesh.channel(name);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            loop {
                let serving = HealthClient::new(channel.clone())
                    .check(HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .is_ok_and(|r| r.into_inner().status == ServingStatus::Serving as i32);
                if serving {
                    break;
                }
                // A process that exited (a port taken meanwhile, a bad
                // setting) or never got ready says why in its log.
                let exited = mesh.procs[i].child.try_wait().ok().flatten();
                if exited.is_some() || tokio::time::Instant::now() > deadline {
                    let log = std::fs::read_to_string(mesh.dir.path().join(format!("{name}.log")))
                        .unwrap_or_default();
                    let tail: Vec<&str> = log.lines().rev().take(30).collect();
                    anyhow::bail!(
                        "{name} is not SERVING ({}); the end of its log:\n{}",
                        exited.map_or("still running after 60s".to_owned(), |s| format!(
                            "exited: {s}"
                        )),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(mesh)
    }

    pub fn proc(&self, name: &str) -> &Proc {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .unwrap_or(&self.procs[0])
    }

    /// A channel of its own (one HTTP/2 connection) to `service`.
    pub fn channel(&self, service: &str) -> Channel {
        let port = self.proc(service).port;
        Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
            .map(|e| {
                e.tcp_nodelay(true)
                    .connect_timeout(Duration::from_secs(2))
                    .connect_lazy()
            })
            .unwrap_or_else(|_| unreachable_channel())
    }

    /// Transactions committed so far in this mesh's PostgreSQL databases
    /// (`pg_stat_database`, which backends report about once a second);
    /// `None` on SQLite.
    pub fn pg_commits(&self) -> Option<i64> {
        use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl, sql_types::BigInt};
        #[derive(QueryableByName)]
        struct Commits {
            #[diesel(sql_type = BigInt)]
            n: i64,
        }
        let (admin, names) = self.databases.as_ref()?;
        let list: Vec<String> = names.iter().map(|n| format!("'{n}'")).collect();
        let mut c = PgConnection::establish(admin).ok()?;
        diesel::sql_query(format!(
            "SELECT coalesce(sum(xact_commit), 0)::bigint AS n FROM pg_stat_database \
             WHERE datname IN ({})",
            list.join(", ")
        ))
        .get_result::<Commits>(&mut c)
        .ok()
        .map(|r| r.n)
    }

    pub fn proc_usage(&self, name: &str) -> Usage {
        usage(self.proc(name).pid())
    }

    pub fn usage(&self) -> Vec<(&'static str, Usage)> {
        self.procs
            .iter()
            .map(|p| (p.name, usage(p.child.id())))
            .collect()
    }

    pub fn metrics_url(&self, service: &str) -> String {
        format!("127.0.0.1:{}", self.proc(service).metrics_port)
    }
}

fn unreachable_channel() -> Channel {
    Endpoint::from_static("http://127.0.0.1:1").connect_lazy()
}

impl Drop for Mesh {
    fn drop(&mut self) {
        for p in &mut self.procs {
            let _ = p.child.kill();
            let _ = p.child.wait();
        }
        if let Some((admin, names)) = &self.databases {
            for name in names {
                drop_database(admin, name);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_database_url_names_another_database_on_the_same_server() {
        assert_eq!(
            with_database("postgres://postgres@127.0.0.1:5432/postgres", "b1"),
            "postgres://postgres@127.0.0.1:5432/b1"
        );
        assert_eq!(
            with_database("postgres://u:p@h:5/db?sslmode=disable", "b2"),
            "postgres://u:p@h:5/b2?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h", "b3"), "postgres://h/b3");
    }
}
