//! The mesh under test: the three services as separate processes of this
//! binary (`gpualloc-bench node <service>`, exactly what their own binaries
//! run), each with its own SQLite file, against a throwaway NATS server.
//! Separate processes so that each one's memory and CPU can be measured.

use std::{
    path::{Path, PathBuf},
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
    pub db: PathBuf,
    child: Child,
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

pub struct Mesh {
    pub nats: NatsServer,
    pub dir: tempfile::TempDir,
    pub procs: Vec<Proc>,
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
        for (name, port) in services.iter().zip(&ports) {
            // The floor stands in for the allocation service, on the bus too.
            let user = if *name == "floor" { "allocation" } else { name };
            let db = dir.path().join(format!("{name}.db"));
            let metrics_port = free_port();
            let log = std::fs::File::create(dir.path().join(format!("{name}.log")))?;
            let child = Command::new(exe)
                .args(["node", name])
                .env("GPUALLOC_LISTEN", format!("127.0.0.1:{port}"))
                .env(
                    "GPUALLOC_DATABASE_URL",
                    format!("sqlite://{}", db.display()),
                )
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
                db,
                child,
            });
        }
        let mut mesh = Mesh { nats, dir, procs };
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
    }
}
