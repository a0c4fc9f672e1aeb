//! The saga on a three-node JetStream cluster with a stream of three
//! replicas (issue 16): under a steady load of creates, the stream's
//! leader is SIGKILLed and later started again, then the new leader is cut
//! off by a real partition (its network namespace's link goes down) and
//! healed. Afterwards every acknowledged create is ALLOCATED in the
//! allocation service, the pool and the viewer (which equals the source of
//! truth version for version), no event is stored twice and no allocation
//! has more events than the saga's bound, all within an asserted time.

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use gpualloc_e2e::{Backend, Mesh, Tuning, fixtures::*, tenant};
use gpualloc_proto::{
    allocation::v1::{self as apb, State},
    viewer::v1 as vpb,
};
use gpualloc_testkit::{NatsCluster, eventually};
use tokio::sync::Mutex;

const TENANT: &str = "team-ha";
/// Creates per second the load offers.
const RATE: u64 = 20;
/// The consumers' ack wait in this test (30 s by default).
const ACK_WAIT: Duration = Duration::from_secs(10);
/// Longest the mesh may take, after the faults and the load end, to show
/// every acknowledged create everywhere: a redelivery after the ack wait,
/// and time to apply the backlog.
const CONVERGE_BOUND: Duration = Duration::from_secs(30);

/// Events one allocation's create-to-ALLOCATED saga makes: the view of
/// PENDING, the request, the pool's grant, the view of ALLOCATED.
const EVENT_BOUND: usize = 4;

struct Load {
    acked: Arc<Mutex<Vec<String>>>,
    failed: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

/// Creates at [`RATE`], each with a request id and the client retry policy
/// (the same request id again, three times at most).
fn load(mesh: &Mesh) -> Load {
    let acked = Arc::new(Mutex::new(Vec::new()));
    let failed = Arc::new(Mutex::new(Vec::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (a, f, s, client) = (
        acked.clone(),
        failed.clone(),
        stop.clone(),
        mesh.allocations(),
    );
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(1000 / RATE));
        let mut n = 0u64;
        while !s.load(Ordering::SeqCst) {
            tick.tick().await;
            n += 1;
            let request = apb::CreateAllocationRequest {
                tenant: TENANT.into(),
                resources: Some(gpus(1, "A100")),
                request_id: format!("ha-{n}"),
                ..Default::default()
            };
            let mut last = String::new();
            let mut ok = None;
            for _ in 0..3 {
                match client
                    .clone()
                    .create_allocation(tenant(TENANT, request.clone()))
                    .await
                {
                    Ok(r) => {
                        ok = Some(r.into_inner().allocation_id);
                        break;
                    }
                    Err(e) => last = format!("{:?}: {}", e.code(), e.message()),
                }
            }
            match ok {
                Some(id) => a.lock().await.push(id),
                None => f.lock().await.push(last),
            }
        }
    });
    Load {
        acked,
        failed,
        stop,
        task,
    }
}

async fn acked(load: &Load) -> usize {
    load.acked.lock().await.len()
}

/// The stream's leader and whether every follower is current, as one
/// member of the cluster reports it.
async fn leader(js: &async_nats::jetstream::Context, stream: &str) -> Option<(String, bool)> {
    let info = tokio::time::timeout(Duration::from_secs(3), async {
        js.get_stream(stream).await.ok()?.info().await.ok().cloned()
    })
    .await
    .ok()??;
    let cluster = info.cluster?;
    let leader = cluster.leader?;
    let current = cluster.replicas.len() == 2 && cluster.replicas.iter().all(|r| r.current);
    Some((leader, current))
}

/// Time until a create made now is ALLOCATED in the viewer: the saga's
/// round trip through the stream.
async fn round_trip(mesh: &Mesh, what: &str) -> Duration {
    let start = Instant::now();
    let created = eventually(
        Duration::from_secs(30),
        &format!("a create {what}"),
        || async { try_create(mesh, TENANT, 1).await.ok() },
    )
    .await;
    eventually(
        Duration::from_secs(60),
        &format!("ALLOCATED {what}"),
        || async {
            let v = mesh
                .viewer()
                .get_allocation_view(tenant(
                    TENANT,
                    vpb::GetAllocationViewRequest {
                        allocation_id: created.allocation_id.clone(),
                    },
                ))
                .await
                .ok()?
                .into_inner();
            (v.allocation?.state == State::Allocated as i32).then_some(())
        },
    )
    .await;
    start.elapsed()
}

/// Waits until the members agree on a leader other than `not` (if given)
/// with every follower current; returns it and the time taken.
async fn settled(
    js: &async_nats::jetstream::Context,
    stream: &str,
    not: Option<&str>,
    need_current: bool,
    cluster: &NatsCluster,
) -> (String, Duration) {
    let start = Instant::now();
    let deadline = start + Duration::from_secs(60);
    loop {
        if let Some((l, current)) = leader(js, stream).await
            && Some(l.as_str()) != not
            && (current || !need_current)
        {
            return (l, start.elapsed());
        }
        assert!(
            Instant::now() < deadline,
            "the stream did not settle (leader not {not:?}, followers current: {need_current})\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every event of allocation `id` in the stream, for a failure message.
async fn describe(mesh: &Mesh, id: &str) -> Vec<String> {
    stream_events(mesh)
        .await
        .into_iter()
        .filter(|(_, _, e)| e.allocation_id == id)
        .map(|(seq, subject, e)| {
            let payload = format!("{:?}", e.payload);
            format!(
                "#{seq} {subject} {} v{} {}",
                e.event_id,
                e.aggregate_version,
                &payload[..payload.len().min(160)]
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_jetstream_cluster_loses_nothing_through_a_leader_kill_and_a_partition() {
    let mut nats = NatsCluster::start();
    // Re-drives after the production default: a saga delayed by a fault
    // for less than that has no reason to emit a second request.
    let tuning = Tuning {
        stuck_after: Duration::from_secs(30),
        ..Tuning::default()
    };
    let mesh = Mesh::start_custom(Backend::Sqlite, nats.urls(), tuning, |c| {
        c.stream_replicas = 3;
        // A batch delivered through a member that was then cut off comes
        // again after the ack wait: it bounds the convergence time.
        c.ack_wait = ACK_WAIT;
    })
    .await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 100_000)])).await;
    set_quota(&mesh, TENANT, gpus(100_000, "")).await;
    let js = mesh.jetstream().await;
    let (first, _) = settled(&js, &mesh.stream, None, true, &nats).await;
    let before = round_trip(&mesh, "before the faults").await;

    let load = load(&mesh);
    let progress = |n: usize| {
        let load = &load;
        async move {
            let target = acked(load).await + n;
            eventually(Duration::from_secs(30), "creates acknowledged", || async {
                (acked(load).await >= target).then_some(())
            })
            .await
        }
    };
    progress(40).await;

    // 1. SIGKILL the stream's leader.
    nats.node(&first).kill();
    let (second, elected_after_kill) = settled(&js, &mesh.stream, Some(&first), false, &nats).await;
    let after_kill = round_trip(&mesh, "after the leader was killed").await;
    progress(40).await;
    nats.node(&first).start_again();
    let (_, caught_up) = settled(&js, &mesh.stream, None, true, &nats).await;

    // 2. Cut the (new) leader off from everything, then heal it.
    let (isolated, _) = settled(&js, &mesh.stream, None, true, &nats).await;
    nats.node(&isolated).isolate();
    let (_, elected_after_cut) = settled(&js, &mesh.stream, Some(&isolated), false, &nats).await;
    let after_cut = round_trip(&mesh, "with the leader cut off").await;
    progress(40).await;
    nats.node(&isolated).heal();
    let (_, healed) = settled(&js, &mesh.stream, None, true, &nats).await;
    progress(20).await;

    load.stop.store(true, Ordering::SeqCst);
    load.task.await.unwrap();
    let ended = Instant::now();
    let acked: Vec<String> = load.acked.lock().await.clone();
    let failed = load.failed.lock().await.clone();
    assert!(failed.is_empty(), "creates the client saw fail: {failed:?}");

    // Converged: every allocation ALLOCATED in the allocation service and
    // in the viewer, at the same versions (counted in their databases,
    // cheap enough to poll); then every acknowledged create checked one by
    // one through the API.
    let total = (acked.len() + 3) as i64;
    let allocated = "SELECT COUNT(*) AS n FROM allocations WHERE state = 'ALLOCATED'";
    let versions = "SELECT COALESCE(SUM(version), 0) AS n FROM allocations";
    let viewed = "SELECT COUNT(*) AS n FROM allocation_views WHERE state = 'ALLOCATED'";
    let view_versions = "SELECT COALESCE(SUM(version), 0) AS n FROM allocation_views";
    let deadline = ended + CONVERGE_BOUND;
    loop {
        let a = count(&mesh.allocation_db, allocated).await;
        let v = count(&mesh.viewer_db, viewed).await;
        if a == total
            && v == total
            && count(&mesh.allocation_db, versions).await
                == count(&mesh.viewer_db, view_versions).await
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not converged within {CONVERGE_BOUND:?}: {a} of {total} ALLOCATED, {v} in the viewer\n{}",
            nats.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let converged = ended.elapsed();
    for id in &acked {
        let truth = mesh
            .allocations()
            .get_allocation(tenant(
                TENANT,
                apb::GetAllocationRequest {
                    allocation_id: id.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        let view = mesh
            .viewer()
            .get_allocation_view(tenant(
                TENANT,
                vpb::GetAllocationViewRequest {
                    allocation_id: id.clone(),
                },
            ))
            .await
            .unwrap()
            .into_inner()
            .allocation
            .unwrap();
        assert_eq!(truth.state, State::Allocated as i32, "{id}");
        assert_eq!(
            (view.state, view.version),
            (truth.state, truth.version),
            "{id}"
        );
    }
    // The pool holds exactly what was allocated: the load's creates and
    // the three round-trip probes.
    let used = get_pool(&mesh, "p").await.usage.unwrap_or_default();
    assert_eq!(
        used.gpus_by_model.get("A100").copied().unwrap_or(0) as usize,
        acked.len() + 3,
        "the pool's A100s in use"
    );
    let events = events_per_allocation(&mesh).await;
    assert_eq!(events.len(), acked.len() + 3, "allocations in the stream");
    let most = events.values().map(|(_, ids)| ids.len()).max().unwrap_or(0);
    for (id, (messages, ids)) in &events {
        assert_eq!(*messages, ids.len(), "{id}: an event stored twice");
        if ids.len() > EVENT_BOUND {
            panic!(
                "{id} has {} events: {:#?}",
                ids.len(),
                describe(&mesh, id).await
            );
        }
    }
    println!(
        "jetstream cluster: {} creates at {RATE}/s, none failed; leader {first} killed: \
         new leader {second} in {elected_after_kill:.1?}, saga round trip {after_kill:.1?} \
         (undisturbed {before:.1?}), restarted member current in {caught_up:.1?}; \
         leader {isolated} cut off: new leader in {elected_after_cut:.1?}, round trip \
         {after_cut:.1?}, current again {healed:.1?} after healing; every create \
         everywhere {converged:.1?} after the load ended; at most {most} events each",
        acked.len()
    );
}
