//! Two processes of every service on one PostgreSQL (a database per
//! service) and one NATS, under a few thousand concurrent creates and
//! cancels from many tenants against small pools — once undisturbed, once
//! while each service and NATS is SIGKILLed and restarted. Afterwards:
//! - I1: an auditor checked the counters against the reservations all
//!   along (CHECK constraints and guarded updates stop every commit that
//!   would break them), and once more at the end;
//! - I2: every create the client saw succeed is in a terminal or steady
//!   state in all three services;
//! - I4: the viewer equals the allocation service, version for version;
//!
//! All of that within an asserted bound after the load ends.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use gpualloc_e2e::{
    Svc, admin,
    cluster::{Cluster, audit_i1, rows},
    tenant,
};
use gpualloc_proto::{
    allocation::v1::{self as apb, allocation_service_client::AllocationServiceClient},
    resourcepool::v1 as rp,
};
use rand::{Rng, SeedableRng, rngs::StdRng};
use tokio::sync::Mutex;
use tonic::{Code, transport::Channel};

/// The two tests share the machine's two cores: one at a time.
pub(crate) static SERIAL: Mutex<()> = Mutex::const_new(());

const TENANTS: usize = 16;
const WORKERS: usize = 48;

fn creates() -> usize {
    std::env::var("GPUALLOC_LOAD_CREATES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3_000)
}

fn capacity(cpu: i64, gpus: &[(&str, i32)]) -> rp::Capacity {
    rp::Capacity {
        cpu_millis: cpu,
        memory_mib: 0,
        storage_gib: 0,
        gpus_by_model: gpus.iter().map(|(m, n)| ((*m).to_owned(), *n)).collect(),
        custom: BTreeMap::new(),
    }
}

async fn setup(cluster: &Cluster) {
    let mut pools = cluster.pools().remove(0);
    for (id, cap) in [
        ("gpu-a", capacity(32_000, &[("A100", 6)])),
        ("gpu-b", capacity(32_000, &[("A100", 2), ("H100", 4)])),
        ("gpu-c", capacity(16_000, &[("H100", 2)])),
    ] {
        pools
            .put_pool(admin(rp::PutPoolRequest {
                update_mask: None,
                pool: Some(rp::Pool {
                    pool_id: id.into(),
                    capacity: Some(cap),
                    ..Default::default()
                }),
            }))
            .await
            .unwrap();
    }
    for t in 0..TENANTS {
        pools
            .set_tenant_quota(admin(rp::SetTenantQuotaRequest {
                tenant: format!("team-{t}"),
                limits: Some(rp::Resources {
                    gpus: 10,
                    cpu_millis: 20_000,
                    ..Default::default()
                }),
                ..Default::default()
            }))
            .await
            .unwrap();
    }
}

/// What the clients saw.
#[derive(Default)]
struct Outcome {
    /// Creates that returned OK: (allocation id, tenant).
    acked: Vec<(String, String)>,
    /// Creates refused with FAILED_PRECONDITION (over quota).
    refused: usize,
    /// Creates that never got an answer (every replica tried).
    unanswered: usize,
    cancels: usize,
    /// Answers no client should ever get.
    wrong: Vec<String>,
}

fn transient(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Unknown | Code::DeadlineExceeded | Code::Cancelled
    )
}

async fn worker(
    w: usize,
    clients: Vec<AllocationServiceClient<Channel>>,
    next: Arc<AtomicUsize>,
    total: usize,
) -> Outcome {
    let mut rng = StdRng::seed_from_u64(w as u64);
    let mut out = Outcome::default();
    let t = format!("team-{}", w % TENANTS);
    let models = ["A100", "H100", ""];
    loop {
        let n = next.fetch_add(1, Ordering::SeqCst);
        if n >= total {
            return out;
        }
        let request = apb::CreateAllocationRequest {
            tenant: t.clone(),
            resources: Some(rp::Resources {
                gpus: rng.random_range(1..=2),
                gpu_model: models[rng.random_range(0..3)].into(),
                cpu_millis: rng.random_range(1..=4) * 500,
                ..Default::default()
            }),
            request_id: format!("w{w}-{n}"),
            priority: rng.random_range(0..=2),
            lease: rng.random_bool(0.2).then(|| prost_types::Duration {
                seconds: rng.random_range(1..=4),
                nanos: 0,
            }),
            labels: Default::default(),
            display_name: String::new(),
        };
        // Retried with the same request id on the other replica: the
        // idempotency key makes that safe.
        let mut answered = false;
        for attempt in 0..8 {
            let mut c = clients[(w + attempt) % clients.len()].clone();
            match c.create_allocation(tenant(&t, request.clone())).await {
                Ok(a) => {
                    out.acked.push((a.into_inner().allocation_id, t.clone()));
                    answered = true;
                    break;
                }
                Err(s) if s.code() == Code::FailedPrecondition => {
                    out.refused += 1;
                    answered = true;
                    break;
                }
                Err(s) if transient(s.code()) => {
                    tokio::time::sleep(Duration::from_millis(100 * (attempt as u64 + 1))).await;
                }
                Err(s) => {
                    out.wrong.push(format!("create: {s:?}"));
                    answered = true;
                    break;
                }
            }
        }
        if !answered {
            out.unanswered += 1;
        }
        if !out.acked.is_empty() && rng.random_bool(0.5) {
            let (id, _) = out.acked[rng.random_range(0..out.acked.len())].clone();
            for attempt in 0..8 {
                let mut c = clients[(w + attempt) % clients.len()].clone();
                let r = c
                    .cancel_allocation(tenant(
                        &t,
                        apb::CancelAllocationRequest {
                            allocation_id: id.clone(),
                            reason: "load test".into(),
                        },
                    ))
                    .await;
                match r {
                    Ok(_) => {
                        out.cancels += 1;
                        break;
                    }
                    // Already rejected or expired.
                    Err(s) if s.code() == Code::FailedPrecondition => break,
                    Err(s) if transient(s.code()) => {
                        tokio::time::sleep(Duration::from_millis(100 * (attempt as u64 + 1))).await;
                    }
                    Err(s) => {
                        out.wrong.push(format!("cancel {id}: {s:?}"));
                        break;
                    }
                }
            }
        }
    }
}

/// Runs the load; `progress` counts creates started.
async fn load(cluster: &Cluster, progress: Arc<AtomicUsize>) -> tokio::task::JoinHandle<Outcome> {
    let clients = cluster.allocations();
    let total = creates();
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for w in 0..WORKERS {
            tasks.push(tokio::spawn(worker(
                w,
                clients.clone(),
                progress.clone(),
                total,
            )));
        }
        let mut all = Outcome::default();
        for t in tasks {
            let o = t.await.unwrap();
            all.acked.extend(o.acked);
            all.refused += o.refused;
            all.unanswered += o.unanswered;
            all.cancels += o.cancels;
            all.wrong.extend(o.wrong);
        }
        all
    })
}

/// Audits I1 every 200 ms until stopped; returns (audits, violations).
fn auditor(cluster: &Cluster, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<(i64, i64)> {
    let db_url = cluster.pool_db.url.clone();
    let audits = Arc::new(AtomicI64::new(0));
    tokio::spawn(async move {
        let mut violations = 0;
        while !stop.load(Ordering::SeqCst) {
            violations += audit_i1(&db_url).await;
            audits.fetch_add(1, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        (audits.load(Ordering::SeqCst), violations)
    })
}

/// One pass of the convergence check: Ok when every service agrees,
/// otherwise the problems and the allocations concerned.
async fn converged(
    cluster: &Cluster,
    acked: &[(String, String)],
) -> Result<usize, (String, Vec<String>)> {
    let allocations = rows(
        &cluster.allocation_db.url,
        "SELECT allocation_id AS id, state, version FROM allocations",
    )
    .await;
    let reservations: BTreeMap<String, String> = rows(
        &cluster.pool_db.url,
        "SELECT allocation_id AS id, state, version FROM reservations",
    )
    .await
    .into_iter()
    .map(|r| (r.id, r.state))
    .collect();
    let views: BTreeMap<String, (String, i64)> = rows(
        &cluster.viewer_db.url,
        "SELECT allocation_id AS id, state, version FROM allocation_views",
    )
    .await
    .into_iter()
    .map(|r| (r.id, (r.state, r.version)))
    .collect();
    let stored: BTreeSet<&str> = allocations.iter().map(|r| r.id.as_str()).collect();
    for (id, _) in acked {
        if !stored.contains(id.as_str()) {
            return Err((format!("acknowledged allocation {id} is lost"), vec![]));
        }
    }
    let mut problems = Vec::new();
    let mut ids = Vec::new();
    for a in &allocations {
        let before = problems.len();
        let pool_state = match a.state.as_str() {
            "ALLOCATED" => "GRANTED",
            "HELD" => "HELD",
            "CANCELLED" | "EXPIRED" => "RELEASED",
            "REJECTED" => "REJECTED",
            other => {
                problems.push(format!("{} still {other}", a.id));
                continue;
            }
        };
        match reservations.get(&a.id) {
            Some(s) if s == pool_state => {}
            other => problems.push(format!(
                "{} is {} but the pool has {other:?}",
                a.id, a.state
            )),
        }
        match views.get(&a.id) {
            Some((s, v)) if s == &a.state && *v == a.version => {}
            other => problems.push(format!(
                "{} is {} v{} but the viewer has {other:?}",
                a.id, a.state, a.version
            )),
        }
        if problems.len() > before {
            ids.push(a.id.clone());
        }
    }
    if views.len() != allocations.len() {
        problems.push(format!(
            "the viewer has {} allocations, the allocation service {}",
            views.len(),
            allocations.len()
        ));
    }
    let i1 = audit_i1(&cluster.pool_db.url).await;
    if i1 != 0 {
        problems.push(format!("{i1} counters break I1"));
    }
    if problems.is_empty() {
        Ok(allocations.len())
    } else {
        let n = problems.len();
        problems.truncate(5);
        Err((format!("{n} problems, e.g. {problems:#?}"), ids))
    }
}

/// Polls until converged; fails with the last problem and the services'
/// logs past `bound`. Returns the time it took.
pub(crate) async fn converge(
    cluster: &Cluster,
    acked: &[(String, String)],
    bound: Duration,
) -> Duration {
    let start = Instant::now();
    loop {
        match converged(cluster, acked).await {
            Ok(n) => {
                let took = start.elapsed();
                eprintln!("converged: {n} allocations agree in all three services after {took:?}");
                return took;
            }
            Err((e, ids)) if start.elapsed() > bound => {
                let mut detail = String::new();
                for id in ids.iter().take(3) {
                    detail.push_str(&cluster.explain(id).await);
                }
                panic!(
                    "not converged within {bound:?}: {e}\n{detail}\nlogs in {}:\n{}",
                    cluster.log_dir().display(),
                    cluster.log_tails(30)
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

fn report(o: &Outcome, took: Duration) {
    eprintln!(
        "load: {} acknowledged, {} refused over quota, {} unanswered, {} cancels in {took:?}",
        o.acked.len(),
        o.refused,
        o.unanswered,
        o.cancels
    );
    assert!(
        o.wrong.is_empty(),
        "unexpected answers: {:#?}",
        &o.wrong[..o.wrong.len().min(10)]
    );
    assert!(
        o.acked.len() > creates() / 4,
        "too few creates succeeded for the test to mean anything"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replicas_on_postgres_keep_every_invariant_under_load() {
    let _serial = SERIAL.lock().await;
    let cluster = Cluster::start(env!("CARGO_BIN_EXE_mesh-node"), 2).await;
    setup(&cluster).await;
    let stop = Arc::new(AtomicBool::new(false));
    let audit = auditor(&cluster, stop.clone());
    let started = Instant::now();
    let outcome = load(&cluster, Arc::new(AtomicUsize::new(0)))
        .await
        .await
        .unwrap();
    report(&outcome, started.elapsed());
    assert_eq!(
        outcome.unanswered, 0,
        "a healthy cluster left creates unanswered"
    );
    converge(&cluster, &outcome.acked, Duration::from_secs(60)).await;
    stop.store(true, Ordering::SeqCst);
    let (audits, violations) = audit.await.unwrap();
    assert!(audits > 3, "the auditor ran only {audits} times");
    assert_eq!(violations, 0, "I1 broke during the load");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_crash_of_any_process_loses_nothing_acknowledged() {
    let _serial = SERIAL.lock().await;
    let mut cluster = Cluster::start(env!("CARGO_BIN_EXE_mesh-node"), 2).await;
    setup(&cluster).await;
    let stop = Arc::new(AtomicBool::new(false));
    let audit = auditor(&cluster, stop.clone());
    let progress = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let running = load(&cluster, progress.clone()).await;

    let total = creates();
    let at = |fraction: f64| (total as f64 * fraction) as usize;
    let wait_for = |n: usize| {
        let progress = progress.clone();
        async move {
            while progress.load(Ordering::SeqCst) < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    // Each crash: SIGKILL, a second of downtime under load, restart.
    let downtime = Duration::from_secs(1);
    for (fraction, kind, replica) in [
        (0.15, Svc::Allocation, 0),
        (0.30, Svc::ResourcePool, 1),
        (0.45, Svc::Viewer, 0),
    ] {
        wait_for(at(fraction)).await;
        eprintln!("crash: SIGKILL {kind:?} {replica}");
        cluster.node(kind, replica).kill();
        tokio::time::sleep(downtime).await;
        cluster.node(kind, replica).start();
    }
    wait_for(at(0.60)).await;
    eprintln!("crash: SIGKILL nats-server");
    cluster.nats.kill();
    tokio::time::sleep(downtime).await;
    cluster.nats.start_again();

    let outcome = running.await.unwrap();
    report(&outcome, started.elapsed());
    cluster.wait_serving().await;
    let took = converge(&cluster, &outcome.acked, Duration::from_secs(90)).await;
    eprintln!("after the crashes the mesh converged in {took:?}");
    stop.store(true, Ordering::SeqCst);
    let (audits, violations) = audit.await.unwrap();
    assert!(audits > 3);
    assert_eq!(violations, 0, "I1 broke during the crashes");
}
