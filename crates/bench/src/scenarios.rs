//! The scenarios. Each starts a fresh mesh, so peak memory and CPU time
//! belong to it, and measures its subject next to its baseline in the same
//! run.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    path::PathBuf,
    pin::Pin,
    sync::{Arc, Mutex},
    time::Duration,
};

use gpualloc_proto::{
    allocation::v1::{self as apb, allocation_service_client::AllocationServiceClient},
    resourcepool::v1::{self as rp, resource_pool_service_client::ResourcePoolServiceClient},
    viewer::v1::{self as vpb, viewer_service_client::ViewerServiceClient},
};
use hdrhistogram::Histogram;
use tokio::{sync::oneshot, time::Instant};
use tokio_stream::StreamExt;
use tonic::{Request, metadata::MetadataValue, transport::Channel};
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

use crate::{
    RunArgs,
    load::{self, Outcome},
    mesh::{Mesh, Usage, usage},
};

/// One scenario's numbers.
#[derive(Debug, Default)]
pub struct ScenarioResult {
    pub name: &'static str,
    /// Named values with their unit, in report order.
    pub values: Vec<(String, f64, &'static str)>,
    /// Latency distributions (µs) by label.
    pub latencies: Vec<(String, Histogram<u64>)>,
    pub usage: Vec<(&'static str, Usage)>,
    pub targets: Vec<Target>,
    /// Correctness checks the scenario made (all passed, or it failed).
    pub checks: Vec<String>,
    /// Latency (ms) as something grows, plotted as lines.
    pub curves: Vec<Curve>,
}

/// Series of latencies (ms) over the same x values.
#[derive(Debug, Clone)]
pub struct Curve {
    pub title: String,
    pub x_label: &'static str,
    pub xs: Vec<f64>,
    pub series: Vec<(String, Vec<f64>)>,
}

#[derive(Debug, Clone)]
pub struct Target {
    pub what: String,
    pub value: f64,
    pub goal: f64,
    /// `true`: value ≥ goal is met; `false`: value ≤ goal is met.
    pub at_least: bool,
}

impl Target {
    pub fn met(&self) -> bool {
        if self.at_least {
            self.value >= self.goal
        } else {
            self.value <= self.goal
        }
    }
}

impl ScenarioResult {
    fn value(&mut self, name: impl Into<String>, v: f64, unit: &'static str) {
        self.values.push((name.into(), v, unit));
    }

    fn target(&mut self, what: impl Into<String>, value: f64, goal: f64, at_least: bool) {
        self.targets.push(Target {
            what: what.into(),
            value,
            goal,
            at_least,
        });
    }

    pub fn summary(&self) -> String {
        self.values
            .iter()
            .map(|(n, v, u)| format!("{n}={v:.3}{u}"))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

type ScenarioFn =
    fn(PathBuf, RunArgs) -> Pin<Box<dyn Future<Output = anyhow::Result<ScenarioResult>> + Send>>;

pub const ALL: [(&str, ScenarioFn); 6] = [
    ("quota-check", |e, a| Box::pin(quota_check(e, a))),
    ("create", |e, a| Box::pin(create(e, a))),
    ("saga", |e, a| Box::pin(saga(e, a))),
    ("churn", |e, a| Box::pin(churn(e, a))),
    ("scale", |e, a| Box::pin(scale(e, a))),
    ("fanout", |e, a| Box::pin(fanout(e, a))),
];

const TENANT: &str = "bench";
/// Concurrency of the closed loops: enough to keep two cores busy through
/// network and fsync waits.
const CONCURRENCY: usize = 64;

/// A bearer token of the test issuer, minted once per run: clients send
/// the same token many times, as real ones do (and the services' cache of
/// verified tokens is then part of what is measured).
fn token(tenant: Option<&str>) -> MetadataValue<tonic::metadata::Ascii> {
    static TOKENS: std::sync::OnceLock<[MetadataValue<tonic::metadata::Ascii>; 2]> =
        std::sync::OnceLock::new();
    let [t, a] = TOKENS.get_or_init(|| {
        let day = std::time::Duration::from_secs(86_400);
        let issuer = gpualloc_testkit::auth::issuer();
        let mint = |tenant: Option<&str>, roles: &[&str]| {
            let jwt = issuer
                .token("bench", tenant, roles, day)
                .unwrap_or_default();
            MetadataValue::try_from(format!("Bearer {jwt}"))
                .unwrap_or_else(|_| MetadataValue::from_static(""))
        };
        [mint(Some(TENANT), &[]), mint(None, &["admin"])]
    });
    if tenant.is_some() {
        t.clone()
    } else {
        a.clone()
    }
}

fn as_tenant<T>(m: T) -> Request<T> {
    let mut r = Request::new(m);
    r.metadata_mut()
        .insert("authorization", token(Some(TENANT)));
    r
}

fn as_admin<T>(m: T) -> Request<T> {
    let mut r = Request::new(m);
    r.metadata_mut().insert("authorization", token(None));
    r
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn gpu_request(gpus: i32) -> rp::Resources {
    rp::Resources {
        gpus,
        gpu_model: "A100".into(),
        cpu_millis: 1000,
        memory_mib: 1024,
        ..Default::default()
    }
}

/// A pool and quota large enough for everything a scenario creates (or
/// `gpus` for a small pool).
async fn setup(mesh: &Mesh, gpus: i32) -> anyhow::Result<()> {
    let mut pools = ResourcePoolServiceClient::new(mesh.channel("resource-pool"));
    pools
        .put_pool(as_admin(rp::PutPoolRequest {
            update_mask: None,
            pool: Some(rp::Pool {
                pool_id: "bench".into(),
                capacity: Some(rp::Capacity {
                    cpu_millis: 1_000_000_000_000,
                    memory_mib: 1_000_000_000_000,
                    storage_gib: 1_000_000,
                    gpus_by_model: [("A100".to_owned(), gpus)].into(),
                    custom: Default::default(),
                }),
                ..Default::default()
            }),
        }))
        .await?;
    pools
        .set_tenant_quota(as_admin(rp::SetTenantQuotaRequest {
            tenant: TENANT.into(),
            limits: Some(rp::Resources {
                cpu_millis: 1_000_000_000_000,
                memory_mib: 1_000_000_000_000,
                gpus: i32::MAX,
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await?;
    Ok(())
}

fn create_request(request_id: String) -> Request<apb::CreateAllocationRequest> {
    as_tenant(apb::CreateAllocationRequest {
        tenant: TENANT.into(),
        resources: Some(gpu_request(1)),
        request_id,
        ..Default::default()
    })
}

fn create_op(
    client: AllocationServiceClient<Channel>,
    prefix: String,
) -> impl Fn(u64) -> Pin<Box<dyn Future<Output = bool> + Send>> + Clone + Send + 'static {
    move |i| {
        let mut c = client.clone();
        let request = create_request(format!("{prefix}-{i}"));
        Box::pin(async move { c.create_allocation(request).await.is_ok() })
    }
}

fn check_quota_op(
    pools: ResourcePoolServiceClient<Channel>,
) -> impl Fn(u64) -> Pin<Box<dyn Future<Output = bool> + Send>> + Clone + Send + 'static {
    move |_| {
        let mut p = pools.clone();
        Box::pin(async move {
            p.check_quota(as_tenant(rp::CheckQuotaRequest {
                tenant: TENANT.into(),
                resources: Some(gpu_request(1)),
            }))
            .await
            .is_ok()
        })
    }
}

async fn quota_check(exe: PathBuf, args: RunArgs) -> anyhow::Result<ScenarioResult> {
    let mesh = Mesh::start(&exe).await?;
    setup(&mesh, 1_000_000).await?;
    let mut out = ScenarioResult {
        name: "quota-check",
        ..Default::default()
    };
    let channel = mesh.channel("resource-pool");
    let health = HealthClient::new(channel.clone());
    let pools = ResourcePoolServiceClient::new(channel);
    let health_op = move |_| {
        let mut h = health.clone();
        async move {
            h.check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .is_ok()
        }
    };
    let check_op = check_quota_op(pools);
    let d = args.duration();
    let (mut health_rates, mut check_rates, mut ratios) = (vec![], vec![], vec![]);
    // Interleaved, so both see the same machine.
    for _ in 0..args.runs() {
        let h = load::closed(CONCURRENCY, d, health_op.clone()).await;
        let c = load::closed(CONCURRENCY, d, check_op.clone()).await;
        health_rates.push(h.rate());
        check_rates.push(c.rate());
        ratios.push(c.rate() / h.rate().max(1e-9));
    }
    let (hr, cr, ratio) = (median(health_rates), median(check_rates), median(ratios));
    out.value("health_rps", hr, "/s");
    out.value("check_quota_rps", cr, "/s");
    out.value("ratio", ratio, "×");
    let half = load::open(cr / 2.0, d, check_op).await;
    out.value("p50_at_half_ms", ms(&half.latency, 0.5), "ms");
    out.value("p99_at_half_ms", ms(&half.latency, 0.99), "ms");
    out.latencies
        .push(("CheckQuota at ½ max".into(), half.latency));
    out.target("CheckQuota ≥ 0.8 × health throughput", ratio, 0.8, true);
    out.usage = mesh.usage();
    Ok(out)
}

async fn create(exe: PathBuf, args: RunArgs) -> anyhow::Result<ScenarioResult> {
    let mesh = Mesh::start(&exe).await?;
    setup(&mesh, i32::MAX).await?;
    let mut out = ScenarioResult {
        name: "create",
        ..Default::default()
    };
    let d = args.duration();
    // The floor: the same RPC on the same stack committing the same rows,
    // and nothing else (see `floor`).
    let floor = Mesh::start_services(&exe, &["floor"]).await?;
    let (mut rates, mut base_rates, mut ratios) = (vec![], vec![], vec![]);
    let (mut cpu_alloc, mut cpu_mesh, mut cpu_floor) = (vec![], vec![], vec![]);
    let cpu_of = |m: &Mesh, name: &str| usage(m.proc(name).pid()).cpu_seconds;
    let mut last: Option<Outcome> = None;
    for run in 0..args.runs() {
        let client = AllocationServiceClient::new(mesh.channel("allocation"));
        let (a0, m0) = (cpu_of(&mesh, "allocation"), mesh_cpu_seconds(&mesh));
        let c = load::closed(CONCURRENCY, d, create_op(client, format!("c{run}"))).await;
        let per = |cpu: f64| cpu * 1000.0 / (c.ok as f64).max(1.0);
        cpu_alloc.push(per(cpu_of(&mesh, "allocation") - a0));
        cpu_mesh.push(per(mesh_cpu_seconds(&mesh) - m0));
        let client = AllocationServiceClient::new(floor.channel("floor"));
        let f0 = mesh_cpu_seconds(&floor);
        let b = load::closed(CONCURRENCY, d, create_op(client, format!("f{run}"))).await;
        cpu_floor.push((mesh_cpu_seconds(&floor) - f0) * 1000.0 / (b.ok as f64).max(1.0));
        anyhow::ensure!(
            b.ok > 0,
            "the floor committed nothing ({} errors)",
            b.errors
        );
        rates.push(c.rate());
        base_rates.push(b.rate());
        ratios.push(c.rate() / b.rate().max(1e-9));
        last = Some(c);
    }
    let (r, b, ratio) = (median(rates), median(base_rates), median(ratios));
    out.value("create_rps", r, "/s");
    out.value("floor_rps", b, "/s");
    out.value("ratio", ratio, "×");
    // Where the difference goes: the allocation process's own CPU per
    // create, the whole mesh's (CheckQuota in the pool, the saga the
    // creates start in the pool and the viewer, NATS), and the floor's
    // (its process and NATS).
    out.value("allocation_cpu_ms_per_create", median(cpu_alloc), "ms");
    out.value("mesh_cpu_ms_per_create", median(cpu_mesh), "ms");
    out.value("floor_cpu_ms_per_create", median(cpu_floor), "ms");
    if let Some(c) = last {
        out.value("p50_ms", ms(&c.latency, 0.5), "ms");
        out.value("p99_ms", ms(&c.latency, 0.99), "ms");
        out.latencies
            .push(("CreateAllocation, closed loop".into(), c.latency));
    }
    out.target("CreateAllocation ≥ 3000/s", r, 3000.0, true);
    out.target(
        "create ≥ 0.7 × the floor (same RPC and rows, nothing else)",
        ratio,
        0.7,
        true,
    );
    out.usage = mesh.usage();
    Ok(out)
}

/// Follows WatchAllocations and tells when each allocation is ALLOCATED.
#[derive(Clone, Default)]
struct Arrivals(Arc<Mutex<HashMap<String, Arrival>>>);

enum Arrival {
    Seen(Instant),
    Waiting(oneshot::Sender<Instant>),
}

impl Arrivals {
    fn arrived(&self, id: String, at: Instant) {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match m.remove(&id) {
            Some(Arrival::Waiting(tx)) => {
                let _ = tx.send(at);
            }
            _ => {
                m.insert(id, Arrival::Seen(at));
            }
        }
    }

    async fn wait(&self, id: String, deadline: Duration) -> Option<Instant> {
        let rx = {
            let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
            match m.remove(&id) {
                Some(Arrival::Seen(at)) => return Some(at),
                _ => {
                    let (tx, rx) = oneshot::channel();
                    m.insert(id, Arrival::Waiting(tx));
                    rx
                }
            }
        };
        tokio::time::timeout(deadline, rx).await.ok()?.ok()
    }

    fn count_seen(&self) -> usize {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|a| matches!(a, Arrival::Seen(_)))
            .count()
    }

    fn last_seen(&self) -> Option<Instant> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter_map(|a| match a {
                Arrival::Seen(t) => Some(*t),
                Arrival::Waiting(_) => None,
            })
            .max()
    }

    fn clear(&self) {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clear();
    }
}

async fn watch_allocated(mesh: &Mesh, arrivals: Arrivals) -> anyhow::Result<()> {
    let mut viewer = ViewerServiceClient::new(mesh.channel("viewer"));
    let mut stream = viewer
        .watch_allocations(as_tenant(vpb::WatchAllocationsRequest {
            tenant: TENANT.into(),
            allocation_id: String::new(),
            resume_versions: Default::default(),
        }))
        .await?
        .into_inner();
    tokio::spawn(async move {
        while let Some(Ok(m)) = stream.next().await {
            if m.r#type != vpb::WatchEventType::Change as i32 {
                continue;
            }
            if let Some(a) = m.view.and_then(|v| v.allocation)
                && a.state == apb::State::Allocated as i32
            {
                arrivals.arrived(a.allocation_id, Instant::now());
            }
        }
    });
    Ok(())
}

/// Samples the outbox backlog and consumer lag of every service.
fn sample_backlog(
    mesh: &Mesh,
) -> (
    tokio::task::JoinHandle<(f64, f64)>,
    Arc<std::sync::atomic::AtomicBool>,
) {
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let addrs: Vec<String> = crate::mesh::SERVICES
        .iter()
        .map(|s| mesh.metrics_url(s))
        .collect();
    let flag = stop.clone();
    let task = tokio::spawn(async move {
        let (mut backlog, mut lag) = (0f64, 0f64);
        while !flag.load(std::sync::atomic::Ordering::Relaxed) {
            for a in &addrs {
                if let Some(text) = scrape(a).await {
                    backlog = backlog.max(sum_metric(&text, "gpualloc_outbox_backlog"));
                    lag = lag.max(sum_metric(&text, "gpualloc_consumer_pending"));
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        (backlog, lag)
    });
    (task, stop)
}

async fn scrape(addr: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nhost: bench\r\nconnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).await.ok()?;
    Some(out)
}

fn sum_metric(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

/// The low rate of the saga's latency floor (allocations/s).
const FLOOR_RATE: f64 = 100.0;

/// Creates an allocation and waits until the viewer's watcher saw it
/// ALLOCATED.
fn to_allocated_op(
    mesh: &Mesh,
    arrivals: &Arrivals,
    prefix: &'static str,
) -> impl Fn(u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = bool> + Send>> + Clone + use<>
{
    arrivals.clear();
    let client = AllocationServiceClient::new(mesh.channel("allocation"));
    let arrivals = arrivals.clone();
    move |i| {
        let mut c = client.clone();
        let arrivals = arrivals.clone();
        Box::pin(async move {
            let Ok(a) = c
                .create_allocation(create_request(format!("{prefix}-{i}")))
                .await
            else {
                return false;
            };
            arrivals
                .wait(a.into_inner().allocation_id, Duration::from_secs(30))
                .await
                .is_some()
        })
    }
}

/// CPU seconds the mesh's processes (services and NATS) used so far.
fn mesh_cpu_seconds(mesh: &Mesh) -> f64 {
    let services: f64 = mesh.usage().iter().map(|(_, u)| u.cpu_seconds).sum();
    services + mesh.nats.pid().map_or(0.0, |pid| usage(pid).cpu_seconds)
}

/// The saga's maximum: closed-loop creates until every one is ALLOCATED in
/// the viewer, the median of `--runs` rounds.
async fn saga_max_rate(mesh: &Mesh, arrivals: &Arrivals, args: &RunArgs) -> anyhow::Result<f64> {
    let d = args.duration();
    let mut rates = vec![];
    for run in 0..args.runs() {
        arrivals.clear();
        let client = AllocationServiceClient::new(mesh.channel("allocation"));
        let start = Instant::now();
        let created = load::closed(CONCURRENCY, d, create_op(client, format!("s{run}"))).await;
        // Everything created must reach the viewer as ALLOCATED.
        let deadline = Instant::now() + Duration::from_secs(120);
        while (arrivals.count_seen() as u64) < created.ok && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let done = arrivals.count_seen() as u64;
        anyhow::ensure!(
            done >= created.ok,
            "only {done} of {} allocations reached ALLOCATED in the viewer",
            created.ok
        );
        let end = arrivals.last_seen().unwrap_or_else(Instant::now);
        rates.push(done as f64 / end.duration_since(start).as_secs_f64().max(1e-9));
    }
    Ok(median(rates))
}

async fn saga(exe: PathBuf, args: RunArgs) -> anyhow::Result<ScenarioResult> {
    let mesh = Mesh::start(&exe).await?;
    setup(&mesh, i32::MAX).await?;
    let mut out = ScenarioResult {
        name: "saga",
        ..Default::default()
    };
    let arrivals = Arrivals::default();
    watch_allocated(&mesh, arrivals.clone()).await?;
    let d = args.duration();
    let (sampler, stop_sampling) = sample_backlog(&mesh);
    // With --saga-rate nothing is measured at the maximum: the rate is
    // given, and the targets that read the maximum are left out.
    let measured = match args.saga_rate {
        Some(rate) => {
            out.value("offered_rate", rate, "/s");
            None
        }
        None => {
            let rate = saga_max_rate(&mesh, &arrivals, &args).await?;
            out.value("allocated_per_s", rate, "/s");
            Some(rate)
        }
    };
    let max_rate = measured.or(args.saga_rate).unwrap_or(0.0);

    // At half the maximum: request → ALLOCATED in the viewer.
    let cpu_before = mesh_cpu_seconds(&mesh);
    let commits_before = mesh.pg_commits();
    let half = load::open(max_rate / 2.0, d, to_allocated_op(&mesh, &arrivals, "half")).await;
    if let Some(before) = commits_before {
        // On PostgreSQL: what each allocation costs the server in commits.
        // Backends report their counts at most once a second, so the
        // figure is read until it has held still for longer than that.
        let deadline = Instant::now() + Duration::from_secs(10);
        let (mut after, mut since) = (mesh.pg_commits().unwrap_or(before), Instant::now());
        while Instant::now() < deadline && since.elapsed() < Duration::from_millis(1100) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let now = mesh.pg_commits().unwrap_or(after);
            if now != after {
                (after, since) = (now, Instant::now());
            }
        }
        out.value(
            "pg_commits_per_allocation",
            (after - before) as f64 / (half.ok as f64).max(1.0),
            "",
        );
    }
    // What one allocation costs the mesh's processes at that rate: far
    // steadier between runs than the maximum, so changes show in it first.
    let cpu = mesh_cpu_seconds(&mesh) - cpu_before;
    let cpu_per_allocation = cpu * 1000.0 / (half.latency.len() as f64).max(1.0);
    out.value("cpu_ms_per_allocation_at_half", cpu_per_allocation, "ms");
    // On PostgreSQL the server's CPU is not the mesh's: no goal there.
    if measured.is_some() && crate::mesh::postgres().is_none() {
        out.target(
            "CPU per allocation at ½ max ≤ 0.8 ms",
            cpu_per_allocation,
            0.8,
            false,
        );
    }
    // And at a low rate, where nothing queues: what the hops themselves
    // cost (commits, relays, fetches, the watcher's poll).
    let floor = load::open(
        FLOOR_RATE.min(max_rate / 4.0),
        d,
        to_allocated_op(&mesh, &arrivals, "floor"),
    )
    .await;
    out.value("p50_to_allocated_low_ms", ms(&floor.latency, 0.5), "ms");
    out.value("p99_to_allocated_low_ms", ms(&floor.latency, 0.99), "ms");
    stop_sampling.store(true, std::sync::atomic::Ordering::Relaxed);
    let (backlog, lag) = sampler.await.unwrap_or_default();
    out.value("p50_to_allocated_ms", ms(&half.latency, 0.5), "ms");
    out.value("p99_to_allocated_ms", ms(&half.latency, 0.99), "ms");
    out.value(
        "max_to_allocated_ms",
        half.latency.max() as f64 / 1000.0,
        "ms",
    );
    out.value("lost_at_half", half.errors as f64, "");
    out.value("max_outbox_backlog", backlog, "rows");
    out.value("max_consumer_lag", lag, "events");
    out.latencies.push((
        "request → ALLOCATED in viewer at ½ max".into(),
        half.latency,
    ));
    out.latencies.push((
        format!(
            "request → ALLOCATED in viewer at {:.0}/s",
            FLOOR_RATE.min(max_rate / 4.0)
        ),
        floor.latency,
    ));
    if measured.is_some() {
        // PostgreSQL commits over the network, without SQLite's group
        // commit: its goals are half the rate and twice the p99.
        let (rate_goal, p99_goal) = if crate::mesh::postgres().is_some() {
            (1_500.0, 100.0)
        } else {
            (3_000.0, 50.0)
        };
        out.target(
            format!("saga ≥ {rate_goal} allocations/s end to end"),
            max_rate,
            rate_goal,
            true,
        );
        out.target(
            format!("p99 request → ALLOCATED ≤ {p99_goal} ms at ½ max"),
            ms(&out.latencies[0].1, 0.99),
            p99_goal,
            false,
        );
    }
    out.usage = mesh.usage();
    for (service, u) in &out.usage {
        out.targets.push(Target {
            what: format!("{service} peak RSS ≤ 100 MiB"),
            value: u.peak_rss_kib as f64 / 1024.0,
            goal: 100.0,
            at_least: false,
        });
    }
    anyhow::ensure!(
        half.errors == 0,
        "{} allocations did not reach ALLOCATED",
        half.errors
    );
    Ok(out)
}

async fn churn(exe: PathBuf, args: RunArgs) -> anyhow::Result<ScenarioResult> {
    let mesh = Mesh::start(&exe).await?;
    // Four GPUs for sixteen workers: most requests wait in the hold queue.
    setup(&mesh, 4).await?;
    let mut out = ScenarioResult {
        name: "churn",
        ..Default::default()
    };
    let client = AllocationServiceClient::new(mesh.channel("allocation"));
    let cycles = load::closed(16, args.duration(), move |i| {
        let mut c = client.clone();
        async move {
            let Ok(a) = c
                .create_allocation(create_request(format!("churn-{i}")))
                .await
            else {
                return false;
            };
            c.cancel_allocation(as_tenant(apb::CancelAllocationRequest {
                allocation_id: a.into_inner().allocation_id,
                reason: "churn".into(),
            }))
            .await
            .is_ok()
        }
    })
    .await;
    out.value("cycles_per_s", cycles.rate(), "/s");
    out.value("p99_cycle_ms", ms(&cycles.latency, 0.99), "ms");
    out.latencies
        .push(("create + cancel cycle".into(), cycles.latency));
    // Every cancel releases: the pool ends empty, with nobody held.
    let mut pools = ResourcePoolServiceClient::new(mesh.channel("resource-pool"));
    let deadline = Instant::now() + Duration::from_secs(120);
    let (used, held) = loop {
        let pool = pools
            .get_pool(as_admin(rp::GetPoolRequest {
                pool_id: "bench".into(),
            }))
            .await?
            .into_inner();
        let used = pool
            .usage
            .as_ref()
            .and_then(|u| u.gpus_by_model.get("A100").copied())
            .unwrap_or(0);
        let held = pools
            .list_held(as_admin(rp::ListHeldRequest {
                pool_id: "bench".into(),
                tenant: String::new(),
            }))
            .await?
            .into_inner()
            .held
            .len();
        if (used == 0 && held == 0) || Instant::now() > deadline {
            break (used, held);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    anyhow::ensure!(
        used == 0 && held == 0,
        "capacity did not return: {used} GPUs still used, {held} held"
    );
    out.checks.push(format!(
        "after {} create/cancel cycles on 4 GPUs the pool returned to 0 used, 0 held",
        cycles.ok
    ));
    out.usage = mesh.usage();
    Ok(out)
}

/// Stores `n` finished allocations directly in the allocation and pool
/// databases (history a long-running installation has), SQLite or
/// PostgreSQL.
fn seed(mesh: &Mesh, n: u64) -> anyhow::Result<()> {
    use diesel::{Connection, PgConnection, RunQueryDsl, SqliteConnection};
    let now = gpualloc_domain::time::now_micros() - 86_400_000_000;
    let pg = mesh.proc("allocation").db_url.starts_with("postgres");
    // The row numbers 1..=n and ids made of them, in each dialect.
    let (with, from, id, tenant) = if pg {
        (
            String::new(),
            format!("generate_series(1, {n}) AS seq(n)"),
            "'seed-' || lpad(n::text, 9, '0')",
            "'seed-' || lpad((n % 500)::text, 3, '0')",
        )
    } else {
        (
            format!(
                "WITH RECURSIVE seq(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM seq WHERE n < {n}) "
            ),
            "seq".to_owned(),
            "printf('seed-%09d', n)",
            "printf('seed-%03d', n % 500)",
        )
    };
    for (service, sql) in [
        (
            "allocation",
            format!(
                "{with}INSERT INTO allocations (allocation_id, tenant, state, reason, resources, pool_id, \
                 priority, request_id, fingerprint, labels, lease_micros, version, pool_version, \
                 approved_time, create_time, update_time, expire_time, redrives, redrive_time) \
                 SELECT {id}, {tenant}, 'CANCELLED', 'seeded', \
                 '{{}}', 'bench', 0, {id}, '', '{{}}', NULL, 4, 2, NULL, \
                 {now} + n, {now} + n, NULL, 0, NULL FROM {from}"
            ),
        ),
        (
            "resource-pool",
            format!(
                "{with}INSERT INTO reservations (allocation_id, tenant, state, demand, pool_id, gpu_model, \
                 priority, request_time, lease_micros, hold_deadline, expire_time, reason, outcome, \
                 version, create_time, update_time) \
                 SELECT {id}, {tenant}, 'RELEASED', '{{}}', \
                 'bench', 'A100', 0, {now} + n, NULL, NULL, NULL, 'seeded', 'CANCELLED', 2, \
                 {now} + n, {now} + n FROM {from}"
            ),
        ),
    ] {
        let url = &mesh.proc(service).db_url;
        if pg {
            let mut c = PgConnection::establish(url)?;
            diesel::sql_query(sql).execute(&mut c)?;
        } else {
            let path = url.trim_start_matches("sqlite://");
            let mut c = SqliteConnection::establish(path)?;
            diesel::sql_query("PRAGMA busy_timeout = 60000").execute(&mut c)?;
            diesel::sql_query(sql).execute(&mut c)?;
        }
    }
    Ok(())
}

/// Pools every `scale` mesh has unless it is one of the pool-count points.
const SCALE_POOLS: u64 = 10;

/// Adds pools up to `n` in all (the bench pool is one), each able to take
/// everything a scenario creates, so placement weighs every one of them.
async fn add_pools(mesh: &Mesh, n: u64) -> anyhow::Result<()> {
    let mut pools = ResourcePoolServiceClient::new(mesh.channel("resource-pool"));
    for i in 1..n {
        pools
            .put_pool(as_admin(rp::PutPoolRequest {
                update_mask: None,
                pool: Some(rp::Pool {
                    pool_id: format!("pool-{i:04}"),
                    capacity: Some(rp::Capacity {
                        cpu_millis: 1_000_000_000_000,
                        memory_mib: 1_000_000_000_000,
                        storage_gib: 1_000_000,
                        gpus_by_model: [("A100".to_owned(), 1_000_000)].into(),
                        custom: Default::default(),
                    }),
                    ..Default::default()
                }),
            }))
            .await?;
    }
    Ok(())
}

/// Waits until `mesh` is idle — under 5% of a core over 200 ms — or 10 s
/// have passed.
async fn quiet(mesh: &Mesh) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let window = Duration::from_millis(200);
    loop {
        let before = mesh_cpu_seconds(mesh);
        tokio::time::sleep(window).await;
        let busy = (mesh_cpu_seconds(mesh) - before) / window.as_secs_f64();
        if busy < 0.05 || Instant::now() >= deadline {
            return;
        }
    }
}

/// One point of a growth curve: a mesh with `stored` finished allocations
/// and `pools` pools.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Point {
    stored: u64,
    pools: u64,
}

/// The cost curves: p50 and p99 of CheckQuota and CreateAllocation at a
/// fixed rate as stored history grows (10³ … 10⁶ finished allocations, 10
/// pools) and as pools grow (10, 100, 1,000 pools, 10³ stored). Every
/// point's mesh stays up and the points are measured in turns, round after
/// round, so each sees the same machine (one pass each put all the noise of
/// the moment into a ratio).
async fn scale(exe: PathBuf, args: RunArgs) -> anyhow::Result<ScenarioResult> {
    let mut out = ScenarioResult {
        name: "scale",
        ..Default::default()
    };
    let large = if args.smoke { 10_000 } else { args.scale_large };
    let stored: Vec<u64> = [1_000, 10_000, 100_000, 1_000_000]
        .into_iter()
        .filter(|&n| n < large)
        .chain([large])
        .collect();
    let pool_counts: &[u64] = if args.smoke {
        &[10, 100]
    } else {
        &[10, 100, 1_000]
    };
    let mut points: Vec<Point> = stored
        .iter()
        .map(|&stored| Point {
            stored,
            pools: SCALE_POOLS,
        })
        .chain(pool_counts.iter().map(|&pools| Point {
            stored: 1_000,
            pools,
        }))
        .collect();
    points.sort();
    points.dedup();
    // Half the measurement time per point: there are up to six points, and
    // the question is cost per request, not capacity, at a modest rate.
    let d = args.duration().mul_f64(0.5);
    let rate = if args.smoke { 50.0 } else { 200.0 };
    let mut meshes = Vec::new();
    for p in &points {
        let mesh = Mesh::start(&exe).await?;
        setup(&mesh, i32::MAX).await?;
        add_pools(&mesh, p.pools).await?;
        let seeding = Instant::now();
        seed(&mesh, p.stored)?;
        eprintln!(
            "bench: scale: seeded {} allocations and {} pools in {:?}",
            p.stored,
            p.pools,
            seeding.elapsed()
        );
        meshes.push((*p, mesh));
    }
    const OPS: [(&str, &str); 2] = [
        ("CheckQuota", "check_quota"),
        ("CreateAllocation", "create"),
    ];
    // Per point and operation: each round's p50 and p99 (medians are
    // reported) and every sample (for the distribution table).
    type Key = (&'static str, Point);
    let mut rounds: BTreeMap<Key, Vec<(f64, f64)>> = BTreeMap::new();
    let mut all: BTreeMap<Key, Histogram<u64>> = BTreeMap::new();
    for run in 0..args.runs() {
        for (p, mesh) in &meshes {
            let pools = ResourcePoolServiceClient::new(mesh.channel("resource-pool"));
            let check = load::open(rate, d, check_quota_op(pools)).await;
            let client = AllocationServiceClient::new(mesh.channel("allocation"));
            let prefix = format!("scale{}x{}-{run}", p.stored, p.pools);
            let create = load::open(rate, d, create_op(client, prefix)).await;
            // The sagas those creates started finish here, not during the
            // next point's measurement.
            quiet(mesh).await;
            for ((what, _), o) in OPS.into_iter().zip([check, create]) {
                rounds
                    .entry((what, *p))
                    .or_default()
                    .push((ms(&o.latency, 0.5), ms(&o.latency, 0.99)));
                match all.get_mut(&(what, *p)) {
                    Some(h) => {
                        if let Err(e) = h.add(&o.latency) {
                            eprintln!("bench: scale: merging histograms: {e}");
                        }
                    }
                    None => {
                        all.insert((what, *p), o.latency);
                    }
                }
            }
        }
    }
    let at = |what: &str, p: Point| -> (f64, f64) {
        let r = rounds
            .iter()
            .find(|((w, q), _)| *w == what && *q == p)
            .map(|(_, r)| r.clone())
            .unwrap_or_default();
        (
            median(r.iter().map(|x| x.0).collect()),
            median(r.iter().map(|x| x.1).collect()),
        )
    };
    for p in &points {
        for (what, key) in OPS {
            let (p50, p99) = at(what, *p);
            let tag = format!("{}_stored_{}_pools", p.stored, p.pools);
            out.value(format!("{key}_p50_ms_at_{tag}"), p50, "ms");
            out.value(format!("{key}_p99_ms_at_{tag}"), p99, "ms");
            if let Some(h) = all.remove(&(what, *p)) {
                out.latencies
                    .push((format!("{what}, {} stored, {} pools", p.stored, p.pools), h));
            }
        }
    }
    // The two curves, and the ratio of each curve's ends.
    let curves: [(&str, &str, Vec<Point>); 2] = [
        (
            "Cost by stored allocations (10 pools)",
            "stored allocations",
            points
                .iter()
                .copied()
                .filter(|p| p.pools == SCALE_POOLS)
                .collect(),
        ),
        (
            "Cost by pools (10³ stored allocations)",
            "pools",
            points
                .iter()
                .copied()
                .filter(|p| p.stored == 1_000)
                .collect(),
        ),
    ];
    for (title, x_label, along) in curves {
        let by_pools = x_label == "pools";
        let x = |p: &Point| if by_pools { p.pools } else { p.stored } as f64;
        let mut series = Vec::new();
        for (what, key) in OPS {
            let ys: Vec<(f64, f64)> = along.iter().map(|p| at(what, *p)).collect();
            if let (Some(first), Some(last), Some(a), Some(b)) =
                (along.first(), along.last(), ys.first(), ys.last())
            {
                let name = if by_pools { "pools" } else { "stored" };
                let (lo, hi) = (x(first), x(last));
                for (q, small, big) in [("p50", a.0, b.0), ("p99", a.1, b.1)] {
                    let ratio = big / small.max(1e-9);
                    out.value(format!("{key}_{q}_ratio_{name}_{hi}_to_{lo}"), ratio, "×");
                    if !by_pools {
                        out.target(
                            format!("{what} {q} at {hi} stored ≤ 1.2 × at {lo}"),
                            ratio,
                            1.2,
                            false,
                        );
                    }
                }
            }
            series.push((format!("{what} p50"), ys.iter().map(|y| y.0).collect()));
            series.push((format!("{what} p99"), ys.iter().map(|y| y.1).collect()));
        }
        out.curves.push(Curve {
            title: title.to_owned(),
            x_label,
            xs: along.iter().map(x).collect(),
            series,
        });
    }
    // Memory and CPU of the largest history's mesh.
    out.usage = meshes
        .iter()
        .find(|(p, _)| p.stored == large)
        .map(|(_, m)| m.usage())
        .unwrap_or_default();
    Ok(out)
}

/// Watchers `fanout` opens on one viewer.
const WATCHERS: usize = 1_000;
/// Of those, how many watch the tenant the saga runs for (each of its
/// changes goes to all of them); the rest watch tenants with nothing
/// happening, like dashboards left open.
const BUSY_WATCHERS: usize = 10;

/// 1,000 watchers on one viewer while the saga runs at half its maximum:
/// how late changes reach watchers (receipt − the change's `update_time`),
/// and what the watchers cost the viewer, against the same half-rate load
/// without them in the same mesh.
async fn fanout(exe: PathBuf, args: RunArgs) -> anyhow::Result<ScenarioResult> {
    let mesh = Mesh::start(&exe).await?;
    setup(&mesh, i32::MAX).await?;
    let mut out = ScenarioResult {
        name: "fanout",
        ..Default::default()
    };
    let arrivals = Arrivals::default();
    watch_allocated(&mesh, arrivals.clone()).await?;
    let d = args.duration();
    let rate = match args.saga_rate {
        Some(rate) => rate,
        None => saga_max_rate(&mesh, &arrivals, &args).await?,
    } / 2.0;
    out.value("offered_rate", rate, "/s");
    let viewer_cpu = || usage(mesh.proc("viewer").pid()).cpu_seconds;

    // The same load without the watchers first.
    let c0 = viewer_cpu();
    let alone = load::open(rate, d, to_allocated_op(&mesh, &arrivals, "alone")).await;
    let per_alloc = |cpu: f64, o: &Outcome| cpu * 1000.0 / (o.ok as f64).max(1.0);
    out.value(
        "viewer_cpu_ms_per_allocation_alone",
        per_alloc(viewer_cpu() - c0, &alone),
        "ms",
    );

    // The viewer's memory with the watchers is what they add to what it
    // holds now: the closed loop that found the maximum rate (a backlog at
    // full speed) must not count as the watchers' peak.
    let viewer_pid = mesh.proc("viewer").pid();
    out.value(
        "viewer_peak_rss_mib_before_watchers",
        usage(viewer_pid).peak_rss_kib as f64 / 1024.0,
        "MiB",
    );
    crate::mesh::reset_peak_rss(viewer_pid)?;

    // The watchers, over ten connections, each with its snapshot done.
    let deliveries = Arc::new(Mutex::new(load::histogram()));
    let ready = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let channels: Vec<Channel> = (0..10).map(|_| mesh.channel("viewer")).collect();
    for w in 0..WATCHERS {
        let tenant = if w < BUSY_WATCHERS {
            TENANT.to_owned()
        } else {
            format!("idle-{w}")
        };
        let mut viewer = ViewerServiceClient::new(channels[w % channels.len()].clone());
        let mut stream = viewer
            .watch_allocations(as_admin(vpb::WatchAllocationsRequest {
                tenant,
                allocation_id: String::new(),
                resume_versions: Default::default(),
            }))
            .await?
            .into_inner();
        let (deliveries, ready) = (deliveries.clone(), ready.clone());
        tokio::spawn(async move {
            while let Some(Ok(m)) = stream.next().await {
                if m.r#type == vpb::WatchEventType::SnapshotEnd as i32 {
                    ready.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                let changed = m
                    .view
                    .and_then(|v| v.allocation)
                    .and_then(|a| a.update_time)
                    .map(|t| gpualloc_domain::time::from_timestamp(&t));
                if let (true, Some(changed)) =
                    (m.r#type == vpb::WatchEventType::Change as i32, changed)
                {
                    let late = gpualloc_domain::time::now_micros() - changed;
                    if let Ok(mut all) = deliveries.lock() {
                        let _ = all.record(late.max(1) as u64);
                    }
                }
            }
        });
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while ready.load(std::sync::atomic::Ordering::Relaxed) < WATCHERS {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {WATCHERS} watchers got their snapshot",
            ready.load(std::sync::atomic::Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let c1 = viewer_cpu();
    let watched = load::open(rate, d, to_allocated_op(&mesh, &arrivals, "watched")).await;
    out.value(
        "viewer_cpu_ms_per_allocation_watched",
        per_alloc(viewer_cpu() - c1, &watched),
        "ms",
    );
    // Every allocation of the run reached ALLOCATED in the viewer; each
    // busy watcher gets at least its PENDING and ALLOCATED versions, the
    // last of them shortly after.
    let expected = (BUSY_WATCHERS as u64) * 2 * watched.ok;
    let received = || deliveries.lock().map_or(0, |h| h.len());
    let deadline = Instant::now() + Duration::from_secs(30);
    while received() < expected && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::ensure!(
        received() >= expected,
        "the busy watchers received {} of at least {expected} changes",
        received()
    );
    let deliveries = deliveries
        .lock()
        .map(|h| h.clone())
        .unwrap_or_else(|_| load::histogram());
    anyhow::ensure!(!deliveries.is_empty(), "the busy watchers received nothing");
    out.value("deliveries", deliveries.len() as f64, "");
    out.value("delivery_p50_ms", ms(&deliveries, 0.5), "ms");
    out.value("delivery_p99_ms", ms(&deliveries, 0.99), "ms");
    out.value("p99_to_allocated_alone_ms", ms(&alone.latency, 0.99), "ms");
    out.value(
        "p99_to_allocated_watched_ms",
        ms(&watched.latency, 0.99),
        "ms",
    );
    out.value("lost_watched", watched.errors as f64, "");
    let viewer_rss = mesh.proc_usage("viewer").peak_rss_kib as f64 / 1024.0;
    out.value("viewer_peak_rss_mib_with_watchers", viewer_rss, "MiB");
    out.target(
        "watch delivery p99 ≤ 100 ms (1,000 watchers, saga at ½ max)",
        ms(&deliveries, 0.99),
        100.0,
        false,
    );
    out.target(
        "viewer RSS ≤ 200 MiB with 1,000 watchers",
        viewer_rss,
        200.0,
        false,
    );
    out.latencies.push((
        format!("watch delivery, {WATCHERS} watchers ({BUSY_WATCHERS} busy)"),
        deliveries,
    ));
    out.latencies
        .push(("request → ALLOCATED, no watchers".into(), alone.latency));
    out.latencies.push((
        format!("request → ALLOCATED, {WATCHERS} watchers"),
        watched.latency,
    ));
    out.usage = mesh.usage();
    Ok(out)
}
