//! High availability on PostgreSQL (issue 16), each test against real
//! processes (the `mesh-node` binary) under a steady client load through
//! the documented client retry policy (`gpualloc-client`):
//! - a rolling restart of every replica of every service is invisible to
//!   clients and to a watcher that resumes from the last versions it saw;
//! - a PostgreSQL restart takes the services out of the balance (health
//!   NOT_SERVING) and back by themselves, losing nothing acknowledged;
//! - a broker outage longer than a minute: creates are still accepted, the
//!   outbox grows (and its metric shows it), and everything drains after.

use std::{
    collections::BTreeMap,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use gpualloc_e2e::{
    Svc, admin,
    cluster::{Cluster, pg_count, rows},
    fixtures::{metric, scrape},
    tenant,
};
use gpualloc_proto::{
    allocation::v1::{self as apb, allocation_service_client::AllocationServiceClient},
    resourcepool::v1::{self as rp, resource_pool_service_client::ResourcePoolServiceClient},
    viewer::v1::{self as vpb, WatchEventType, viewer_service_client::ViewerServiceClient},
};
use gpualloc_testkit::{PgServer, eventually};
use tokio::{sync::Mutex, task::JoinSet};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::replicas::{SERIAL, converge};

const T: &str = "team-ha";
const BIN: &str = env!("CARGO_BIN_EXE_mesh-node");

async fn setup(cluster: &Cluster) {
    let mut pools = ResourcePoolServiceClient::new(cluster.failover(Svc::ResourcePool));
    pools
        .put_pool(admin(rp::PutPoolRequest {
            update_mask: None,
            pool: Some(rp::Pool {
                pool_id: "ha".into(),
                capacity: Some(rp::Capacity {
                    cpu_millis: 1_000_000_000,
                    ..Default::default()
                }),
                ..Default::default()
            }),
        }))
        .await
        .unwrap();
    pools
        .set_tenant_quota(admin(rp::SetTenantQuotaRequest {
            tenant: T.into(),
            limits: Some(rp::Resources {
                cpu_millis: 1_000_000_000,
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await
        .unwrap();
}

/// What the load's clients saw.
#[derive(Default)]
struct Seen {
    /// Acknowledged creates: (allocation id, tenant).
    acked: Vec<(String, String)>,
    /// Calls that failed after the retry policy: (code, message).
    failed: Vec<(Code, String)>,
    /// Latency of every call that succeeded.
    latencies: Vec<Duration>,
}

impl Seen {
    fn percentile(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    }
}

/// Offers `rate` creates per second, each followed by a get of what it
/// created, until `stop`; every call through the failover client.
fn traffic(
    cluster: &Cluster,
    rate: u64,
    stop: Arc<AtomicBool>,
) -> (Arc<Mutex<Seen>>, tokio::task::JoinHandle<()>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let client = AllocationServiceClient::new(cluster.failover(Svc::Allocation));
    let s = seen.clone();
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
        let mut calls = JoinSet::new();
        let mut n = 0u64;
        while !stop.load(Ordering::SeqCst) {
            tick.tick().await;
            n += 1;
            let (mut c, s) = (client.clone(), s.clone());
            calls.spawn(async move {
                let request = apb::CreateAllocationRequest {
                    tenant: T.into(),
                    resources: Some(rp::Resources {
                        cpu_millis: 100,
                        ..Default::default()
                    }),
                    request_id: format!("ha-{n}"),
                    ..Default::default()
                };
                let start = Instant::now();
                let created = c.create_allocation(tenant(T, request)).await;
                let id = match created {
                    Ok(a) => {
                        let id = a.into_inner().allocation_id;
                        let mut s = s.lock().await;
                        s.latencies.push(start.elapsed());
                        s.acked.push((id.clone(), T.to_owned()));
                        id
                    }
                    Err(e) => {
                        s.lock()
                            .await
                            .failed
                            .push((e.code(), format!("create: {}", e.message())));
                        return;
                    }
                };
                let start = Instant::now();
                let got = c
                    .get_allocation(tenant(T, apb::GetAllocationRequest { allocation_id: id }))
                    .await;
                let mut s = s.lock().await;
                match got {
                    Ok(_) => s.latencies.push(start.elapsed()),
                    Err(e) => s.failed.push((e.code(), format!("get: {}", e.message()))),
                }
            });
        }
        while calls.join_next().await.is_some() {}
    });
    (seen, task)
}

async fn acked(seen: &Mutex<Seen>) -> usize {
    seen.lock().await.acked.len()
}

/// Waits until `n` more creates are acknowledged.
async fn progress(seen: &Mutex<Seen>, n: usize, within: Duration) {
    let target = acked(seen).await + n;
    eventually(
        within,
        &format!("{n} more creates acknowledged"),
        || async { (acked(seen).await >= target).then_some(()) },
    )
    .await;
}

/// A client's watch of the tenant that reconnects (through the failover
/// client) with the last version it saw of each allocation.
#[derive(Default)]
struct Watched {
    /// Versions received per allocation, in order.
    versions: BTreeMap<String, Vec<i64>>,
    reconnects: usize,
}

fn watcher(cluster: &Cluster, stop: Arc<AtomicBool>) -> Arc<Mutex<Watched>> {
    let watched = Arc::new(Mutex::new(Watched::default()));
    let client = ViewerServiceClient::new(cluster.failover(Svc::Viewer));
    let w = watched.clone();
    tokio::spawn(async move {
        while !stop.load(Ordering::SeqCst) {
            let resume: BTreeMap<String, i64> = w
                .lock()
                .await
                .versions
                .iter()
                .filter_map(|(id, v)| Some((id.clone(), *v.last()?)))
                .collect();
            let request = vpb::WatchAllocationsRequest {
                tenant: String::new(),
                allocation_id: String::new(),
                resume_versions: resume,
            };
            if let Ok(stream) = client.clone().watch_allocations(tenant(T, request)).await {
                let mut stream = stream.into_inner();
                while let Some(Ok(m)) = stream.next().await {
                    if m.r#type == WatchEventType::SnapshotEnd as i32 {
                        continue;
                    }
                    if let Some(a) = m.view.and_then(|v| v.allocation) {
                        w.lock()
                            .await
                            .versions
                            .entry(a.allocation_id)
                            .or_default()
                            .push(a.version);
                    }
                }
            }
            w.lock().await.reconnects += 1;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    });
    watched
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_of_every_replica_is_invisible_to_clients() {
    let _serial = SERIAL.lock().await;
    // NOT_SERVING a second before the GOAWAY: what a replica being
    // stopped does behind a load balancer.
    let mut cluster = Cluster::start_with_env(BIN, 2, &[("GPUALLOC_SHUTDOWN_DELAY", "1s")]).await;
    setup(&cluster).await;
    let stop = Arc::new(AtomicBool::new(false));
    let watched = watcher(&cluster, stop.clone());
    let (seen, load) = traffic(&cluster, 40, stop.clone());
    progress(&seen, 40, Duration::from_secs(30)).await;
    let before = seen.lock().await.latencies.len();

    let roll = Instant::now();
    for kind in (0..soak_rounds()).flat_map(|_| [Svc::ResourcePool, Svc::Allocation, Svc::Viewer]) {
        for replica in 0..2 {
            let node = cluster.node(kind, replica);
            let status = node.terminate().await;
            assert!(
                status.is_some_and(|s| s.success()),
                "{kind:?} {replica} did not stop cleanly: {status:?}"
            );
            node.start();
            let node = &*node;
            eventually(
                Duration::from_secs(60),
                "the restarted replica SERVING",
                || async { node.serving().await.then_some(()) },
            )
            .await;
        }
    }
    let rolled = roll.elapsed();
    progress(&seen, 40, Duration::from_secs(30)).await;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();

    let seen = seen.lock().await;
    assert!(
        seen.failed.is_empty(),
        "{} calls failed during the roll, e.g. {:?}",
        seen.failed.len(),
        &seen.failed[..seen.failed.len().min(5)]
    );
    let during = Seen {
        latencies: seen.latencies[before..].to_vec(),
        ..Default::default()
    };
    converge(&cluster, &seen.acked, Duration::from_secs(60)).await;

    // The watcher has every allocation at its final version, and never
    // got a version twice or skipped one of an allocation it knew.
    let finals: BTreeMap<String, i64> = rows(
        &cluster.viewer_db.url,
        "SELECT allocation_id AS id, state, version FROM allocation_views",
    )
    .await
    .into_iter()
    .map(|r| (r.id, r.version))
    .collect();
    eventually(
        Duration::from_secs(30),
        "the watcher at every final version",
        || async {
            let w = watched.lock().await;
            finals
                .iter()
                .all(|(id, v)| w.versions.get(id).and_then(|s| s.last()) == Some(v))
                .then_some(())
        },
    )
    .await;
    let w = watched.lock().await;
    for (id, versions) in &w.versions {
        for pair in versions.windows(2) {
            assert!(
                pair[1] > pair[0],
                "{id}: version {} again after {}",
                pair[1],
                pair[0]
            );
            assert_eq!(
                pair[1],
                pair[0] + 1,
                "{id}: versions {versions:?} have a gap"
            );
        }
    }
    assert!(
        w.reconnects >= 1,
        "the watcher never moved ({} reconnects)",
        w.reconnects
    );
    println!(
        "rolling restart of 6 replicas ({} rounds) in {rolled:.1?} under {} creates + gets at 40/s: \
         0 failed calls; latency during the roll p50 {:.1?}, p99 {:.1?}, max {:.1?}; \
         the watcher reconnected {} times and saw {} allocations without a gap or a duplicate",
        soak_rounds(),
        seen.acked.len(),
        during.percentile(0.5),
        during.percentile(0.99),
        during.percentile(1.0),
        w.reconnects,
        w.versions.len()
    );
}

/// Rolls to run (`GPUALLOC_SOAK_ROUNDS`, default 1): a soak repeats the
/// roll under the same load.
fn soak_rounds() -> usize {
    std::env::var("GPUALLOC_SOAK_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1)
}

/// How long the broker stays away (`GPUALLOC_SOAK_OUTAGE_SECS`, default
/// 65: past a minute).
fn outage() -> Duration {
    Duration::from_secs(
        std::env::var("GPUALLOC_SOAK_OUTAGE_SECS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(65),
    )
}

async fn all_serving(cluster: &Cluster, serving: bool) -> bool {
    for node in &cluster.nodes {
        if node.serving().await != serving {
            return false;
        }
    }
    true
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_postgres_restart_takes_services_out_and_back_and_loses_nothing() {
    let _serial = SERIAL.lock().await;
    let mut pg = PgServer::start();
    let cluster = Cluster::start_on(BIN, 1, &[], &pg.admin_url()).await;
    setup(&cluster).await;
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, load) = traffic(&cluster, 20, stop.clone());
    progress(&seen, 40, Duration::from_secs(30)).await;

    pg.stop();
    let down = Instant::now();
    eventually(
        Duration::from_secs(20),
        "every service NOT_SERVING",
        || async { all_serving(&cluster, false).await.then_some(()) },
    )
    .await;
    let noticed = down.elapsed();
    let failed_before = seen.lock().await.failed.len();
    // The database stays away a while under load.
    tokio::time::sleep(Duration::from_secs(3)).await;
    pg.start_again();
    let up = Instant::now();
    eventually(
        Duration::from_secs(60),
        "every service SERVING again",
        || async { all_serving(&cluster, true).await.then_some(()) },
    )
    .await;
    let recovered = up.elapsed();
    progress(&seen, 40, Duration::from_secs(30)).await;
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();

    let seen = seen.lock().await;
    // Calls during the outage fail, with a status that says to retry.
    for (code, message) in &seen.failed {
        assert!(
            matches!(code, Code::Unavailable | Code::DeadlineExceeded),
            "a call failed with {code:?}: {message}"
        );
    }
    let took = converge(&cluster, &seen.acked, Duration::from_secs(60)).await;
    println!(
        "PostgreSQL stopped under 20 creates/s: every service NOT_SERVING after {noticed:.1?} \
         ({failed_before} calls failed by then), SERVING again {recovered:.1?} after it \
         restarted; {} calls failed in all (UNAVAILABLE); all {} acknowledged creates \
         converged {took:.1?} after the load",
        seen.failed.len(),
        seen.acked.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_broker_outage_of_over_a_minute_accepts_creates_and_drains_after() {
    // Mostly idle while the broker is away: not serialised with the
    // busy tests.
    let mut cluster = Cluster::start(BIN, 1).await;
    setup(&cluster).await;
    let allocation = cluster
        .nodes
        .iter()
        .find(|n| n.kind == Svc::Allocation)
        .unwrap()
        .metrics_addr();
    let backlog = || {
        let addr = allocation.clone();
        async move {
            metric(
                &scrape(&addr).await,
                "gpualloc_outbox_backlog",
                &[("service", "allocation")],
            )
        }
    };
    let stop = Arc::new(AtomicBool::new(false));
    let (seen, load) = traffic(&cluster, 10, stop.clone());
    progress(&seen, 20, Duration::from_secs(30)).await;

    cluster.nats.stop();
    let outage_started = Instant::now();
    let acked_at_start = acked(&seen).await;
    eventually(
        Duration::from_secs(30),
        "the outbox backlog growing in the metric",
        || async { (backlog().await >= 50.0).then_some(()) },
    )
    .await;
    let connected = metric(
        &scrape(&allocation).await,
        "gpualloc_nats_connected",
        &[("service", "allocation")],
    );
    assert_eq!(
        connected, 0.0,
        "gpualloc_nats_connected while the broker is away"
    );
    assert!(
        all_serving(&cluster, true).await,
        "a broker outage took a replica out"
    );
    // The outage lasts past a minute (its length is the fault, not a wait
    // for something to happen).
    tokio::time::sleep(outage().saturating_sub(outage_started.elapsed())).await;
    let accepted = acked(&seen).await - acked_at_start;
    let peak = backlog().await;
    cluster.nats.start_again();
    let back = Instant::now();
    // Drained: every row written before the broker came back is published
    // (the load goes on writing new ones meanwhile).
    let waiting = format!(
        "SELECT COUNT(*) AS n FROM outbox WHERE published_at IS NULL AND created_at < {}",
        gpualloc_domain::time::now_micros()
    );
    let deadline = back + Duration::from_secs(60);
    loop {
        let left = pg_count(&cluster.allocation_db.url, &waiting).await;
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{left} outbox rows not published 60s after the broker came back (backlog metric {})\n{}\n==== nats-server ====\n{}",
            backlog().await,
            cluster.log_tails(40),
            cluster.nats.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let drained = back.elapsed();
    stop.store(true, Ordering::SeqCst);
    load.await.unwrap();

    let seen = seen.lock().await;
    assert!(
        seen.failed.is_empty(),
        "calls failed while the broker was away: {:?}",
        &seen.failed[..seen.failed.len().min(5)]
    );
    assert!(
        accepted >= 500,
        "only {accepted} creates accepted during the outage"
    );
    // Two rows per create (the PENDING view and the request): sagas whose
    // event never left are not re-driven into more rows.
    assert!(
        peak <= 2.0 * seen.acked.len() as f64,
        "the outbox grew to {peak} rows for {} creates",
        seen.acked.len()
    );
    let took = converge(&cluster, &seen.acked, Duration::from_secs(60)).await;
    println!(
        "broker away {:.0?} under 10 creates/s: {accepted} creates accepted meanwhile, the \
         outbox peaked at {peak} rows and drained {drained:.1?} after the broker came back; \
         all {} acknowledged creates converged {took:.1?} after the load",
        back.duration_since(outage_started),
        seen.acked.len()
    );
}
