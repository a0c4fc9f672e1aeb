//! The viewer as its users see it: WatchAllocations (snapshot, then every
//! change once and in order, across replicas, a slow watcher cut off),
//! projections under duplicate and re-ordered events, usage reports across
//! a month boundary with a rate card, and a rebuild from the stream that
//! equals the incrementally built read model.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::{collections::BTreeMap, time::Duration};

use diesel::{QueryableByName, RunQueryDsl, sql_query, sql_types::Text};
use gpualloc_domain::time;
use gpualloc_e2e::{Backend, Mesh, Service, Svc, Tuning, admin, fixtures::*, tenant};
use gpualloc_proto::{
    allocation::v1::{self as apb, State},
    events::v1 as ev,
    resourcepool::v1 as rp,
    viewer::v1::{self as vpb, WatchEventType, viewer_service_client::ViewerServiceClient},
};
use gpualloc_storage::DbError;
use gpualloc_testkit::{TestDb, eventually};
use tokio_stream::StreamExt;
use tonic::{Code, Streaming, transport::Endpoint};

const DEADLINE: Duration = Duration::from_secs(60);

async fn watch(
    client: &mut ViewerServiceClient<tonic::transport::Channel>,
    t: &str,
) -> Streaming<vpb::WatchAllocationsResponse> {
    client
        .watch_allocations(tenant(
            t,
            vpb::WatchAllocationsRequest {
                tenant: t.into(),
                allocation_id: String::new(),
                resume_versions: Default::default(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
}

/// What one watcher has seen: the versions of each allocation in the order
/// they arrived (snapshot first).
#[derive(Default, Debug)]
struct Seen {
    versions: BTreeMap<String, Vec<i64>>,
    states: BTreeMap<String, i32>,
    changes: usize,
}

impl Seen {
    fn take(&mut self, m: vpb::WatchAllocationsResponse) {
        let a = m.view.unwrap().allocation.unwrap();
        self.versions
            .entry(a.allocation_id.clone())
            .or_default()
            .push(a.version);
        self.states.insert(a.allocation_id, a.state);
    }

    fn last(&self) -> BTreeMap<String, i64> {
        self.versions
            .iter()
            .map(|(id, v)| (id.clone(), *v.last().unwrap()))
            .collect()
    }
}

/// Reads the snapshot up to SNAPSHOT_END.
async fn snapshot(stream: &mut Streaming<vpb::WatchAllocationsResponse>) -> Seen {
    let mut seen = Seen::default();
    loop {
        let m = tokio::time::timeout(DEADLINE, stream.next())
            .await
            .expect("snapshot in time")
            .unwrap()
            .unwrap();
        match WatchEventType::try_from(m.r#type).unwrap() {
            WatchEventType::Snapshot => seen.take(m),
            WatchEventType::SnapshotEnd => return seen,
            other => panic!("{other:?} before SNAPSHOT_END"),
        }
    }
}

/// Reads changes until the watcher has reached `target` (allocation →
/// version), failing after the deadline.
async fn follow_until(
    stream: &mut Streaming<vpb::WatchAllocationsResponse>,
    seen: &mut Seen,
    target: &BTreeMap<String, i64>,
) {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while &seen.last() != target {
        let m = tokio::time::timeout_at(deadline, stream.next())
            .await
            .unwrap_or_else(|_| panic!("watcher stuck at {:?}, expected {target:?}", seen.last()))
            .unwrap()
            .unwrap();
        assert_eq!(m.r#type, WatchEventType::Change as i32);
        seen.changes += 1;
        seen.take(m);
    }
}

/// Follows `stream` on a task while the test drives load, until the
/// target sent on `target` is reached.
fn follower(
    mut stream: Streaming<vpb::WatchAllocationsResponse>,
    mut seen: Seen,
    mut target: tokio::sync::watch::Receiver<Option<BTreeMap<String, i64>>>,
) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        loop {
            if let Some(t) = target.borrow_and_update().as_ref()
                && &seen.last() == t
            {
                return seen;
            }
            tokio::select! {
                m = stream.next() => {
                    let m = m.expect("the stream ended").expect("the watcher was ended");
                    assert_eq!(m.r#type, WatchEventType::Change as i32);
                    seen.changes += 1;
                    seen.take(m);
                }
                _ = target.changed() => {}
            }
        }
    })
}

/// Every allocation's current version in the viewer (the ground truth a
/// watcher must reach).
async fn current_versions(
    client: &mut ViewerServiceClient<tonic::transport::Channel>,
    t: &str,
) -> BTreeMap<String, i64> {
    let mut out = BTreeMap::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_allocation_views(tenant(
                t,
                vpb::ListAllocationViewsRequest {
                    tenant: t.into(),
                    states: vec![],
                    page_size: 500,
                    page_token: token.clone(),
                    label_selector: String::new(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        for v in page.allocations {
            let a = v.allocation.unwrap();
            out.insert(a.allocation_id, a.version);
        }
        if page.next_page_token.is_empty() {
            return out;
        }
        token = page.next_page_token;
    }
}

/// Each allocation's versions arrive once each, consecutively, ending at
/// the current one.
fn assert_exactly_once_in_order(seen: &Seen, target: &BTreeMap<String, i64>) {
    assert_eq!(&seen.last(), target);
    for (id, versions) in &seen.versions {
        for w in versions.windows(2) {
            assert_eq!(w[1], w[0] + 1, "{id}: versions {versions:?} skip or repeat");
        }
    }
}

/// A request whose events are large (32 labels of 250 characters), so a
/// watcher that does not read fills every buffer on the way quickly.
fn heavy(t: &str, n: i32) -> apb::CreateAllocationRequest {
    apb::CreateAllocationRequest {
        tenant: t.into(),
        resources: Some(gpus(1, "A100")),
        labels: (0..32)
            .map(|i| (format!("label-{i:02}"), format!("{n}-{}", "x".repeat(240))))
            .collect(),
        ..Default::default()
    }
}

/// Creates `n` allocations and cancels every other one, from a task.
fn churn(mesh: &Mesh, t: &str, n: i32) -> tokio::task::JoinHandle<Vec<String>> {
    let (allocations, t) = (mesh.allocations(), t.to_owned());
    tokio::spawn(async move {
        let mut ids = Vec::new();
        for i in 0..n {
            let a = allocations
                .clone()
                .create_allocation(tenant(&t, heavy(&t, i)))
                .await
                .unwrap()
                .into_inner();
            if i % 2 == 0 {
                allocations
                    .clone()
                    .cancel_allocation(tenant(
                        &t,
                        apb::CancelAllocationRequest {
                            allocation_id: a.allocation_id.clone(),
                            reason: "churn".into(),
                        },
                    ))
                    .await
                    .unwrap();
            }
            ids.push(a.allocation_id);
        }
        ids
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watcher_gets_a_snapshot_then_every_change_once_in_order() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    let t = "team";
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 8)])).await;
    set_quota(&mesh, t, gpus(1_000, "")).await;
    // Some history before the watcher arrives.
    let before = churn(&mesh, t, 6).await.unwrap();
    for id in &before {
        eventually(DEADLINE, "settled", || async {
            let v = get(&mesh, t, id).await;
            (v.state == State::Allocated as i32 || v.state == State::Cancelled as i32).then_some(())
        })
        .await;
    }

    let mut client = mesh.viewer();
    let mut stream = watch(&mut client, t).await;
    let mut seen = snapshot(&mut stream).await;
    assert!(!seen.versions.is_empty(), "the snapshot shows what exists");

    // Changes keep flowing (creates, grants, holds, cancels, admissions)
    // while the watcher follows.
    let ids = churn(&mesh, t, 40).await.unwrap();
    all_drained(&mesh).await;
    let target = current_versions(&mut client, t).await;
    assert_eq!(target.len(), before.len() + ids.len());
    follow_until(&mut stream, &mut seen, &target).await;
    assert_exactly_once_in_order(&seen, &target);
    // Each is at least PENDING then ALLOCATED or HELD; a cancelled one
    // also CANCELLING and CANCELLED.
    assert!(
        seen.changes >= 20 * 2 + 20 * 3,
        "only {} changes",
        seen.changes
    );
    // Every allocation created after the snapshot arrives from version 1.
    for id in &ids {
        assert_eq!(seen.versions[id][0], 1, "{id}: {:?}", seen.versions[id]);
    }

    // A watcher of one allocation sees only that one.
    let mut one = client
        .watch_allocations(tenant(
            t,
            vpb::WatchAllocationsRequest {
                tenant: t.into(),
                allocation_id: ids[1].clone(),
                resume_versions: Default::default(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let only = snapshot(&mut one).await;
    assert_eq!(only.versions.keys().collect::<Vec<_>>(), [&ids[1]]);

    // Another tenant's allocations are not shown, and watching them is
    // refused.
    let err = client
        .watch_allocations(tenant(
            "intruder",
            vpb::WatchAllocationsRequest {
                tenant: t.into(),
                allocation_id: String::new(),
                resume_versions: Default::default(),
            },
        ))
        .await
        .err()
        .map(|e| e.code());
    assert_eq!(err, Some(Code::PermissionDenied));
}

/// A transaction stamped seconds before it committed (another replica, or
/// contention on PostgreSQL) still reaches a watcher: ordinary polls read
/// only from just before the previous one, and the periodic catch-up poll
/// reads the last few seconds again.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_change_that_commits_late_still_reaches_the_watcher() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    let t = "team";
    let mut client = mesh.viewer();
    let mut stream = watch(&mut client, t).await;
    let mut seen = snapshot(&mut stream).await;
    assert!(seen.versions.is_empty());

    // Committed now, stamped 3 s ago: older than any ordinary poll reads.
    let now = time::now_micros();
    let late = apb::Allocation {
        allocation_id: "late-1".into(),
        tenant: t.into(),
        state: State::Pending as i32,
        version: 1,
        ..Default::default()
    };
    let snapshot_blob = prost::Message::encode_to_vec(&late);
    let blob = snapshot_blob
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect::<String>();
    let sql = format!(
        "INSERT INTO allocation_history (allocation_id, version, event_id, tenant, \
         previous_state, state, reason, change_time, snapshot, project_time) \
         VALUES ('late-1', 1, 'ev-late-1', '{t}', 'UNSPECIFIED', 'PENDING', '', {now}, \
         X'{blob}', {})",
        now - 3_000_000
    );
    open_db(&mesh.viewer_db)
        .await
        .write(move |c| sql_query(&sql).execute(c).map_err(DbError::from))
        .await
        .unwrap();
    follow_until(
        &mut stream,
        &mut seen,
        &BTreeMap::from([("late-1".to_owned(), 1)]),
    )
    .await;
    assert_eq!(seen.versions["late-1"], vec![1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn watchers_on_two_replicas_see_everything_and_a_slow_one_is_cut_off() {
    let tuning = Tuning {
        watch_buffer: 16,
        ..Tuning::default()
    };
    let mesh = Mesh::start_custom(
        Backend::Postgres,
        gpualloc_testkit::nats_url(),
        tuning.clone(),
        |_| {},
    )
    .await;
    // Replica B serves from the same database but consumes a stream of
    // its own that stays empty: everything its watchers see was projected
    // by replica A. (Replicas sharing the consumer are in replicas.rs.)
    let idle_stream = gpualloc_testkit::unique_name("IDLE").to_uppercase();
    let idle = mesh
        .viewer
        .common
        .clone()
        .with_stream(&idle_stream, &gpualloc_testkit::unique_name("idle"));
    let second = Service::spawn_tuned(Svc::Viewer, idle, String::new(), None, tuning).await;
    second.wait_serving().await;
    let t = "team";
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 8)])).await;
    set_quota(&mesh, t, gpus(1_000, "")).await;

    let mut on_a = mesh.viewer();
    let mut on_b = ViewerServiceClient::new(second.channel());
    let mut watch_a = watch(&mut on_a, t).await;
    let mut watch_b = watch(&mut on_b, t).await;
    // The slow watcher reads its snapshot, then nothing: a small HTTP/2
    // window makes its backlog reach the viewer's buffer quickly.
    let slow_channel = Endpoint::from_shared(mesh.viewer.url())
        .unwrap()
        .initial_stream_window_size(Some(8 * 1024))
        .connect()
        .await
        .unwrap();
    let mut slow = watch(&mut ViewerServiceClient::new(slow_channel), t).await;
    let seen_a = snapshot(&mut watch_a).await;
    let seen_b = snapshot(&mut watch_b).await;
    snapshot(&mut slow).await;
    let (target_tx, target_rx) = tokio::sync::watch::channel(None);
    let follow_a = follower(watch_a, seen_a, target_rx.clone());
    let follow_b = follower(watch_b, seen_b, target_rx);

    let ids = churn(&mesh, t, 100).await.unwrap();
    all_drained(&mesh).await;
    let target = current_versions(&mut on_a, t).await;
    assert_eq!(target.len(), ids.len());
    target_tx.send(Some(target.clone())).unwrap();
    // Each watcher sees every change, also on the replica that projected
    // none of them.
    let seen_a = tokio::time::timeout(DEADLINE, follow_a)
        .await
        .unwrap()
        .unwrap();
    let seen_b = tokio::time::timeout(DEADLINE, follow_b)
        .await
        .unwrap()
        .unwrap();
    assert_exactly_once_in_order(&seen_a, &target);
    assert_exactly_once_in_order(&seen_b, &target);
    let idle_messages = mesh
        .jetstream()
        .await
        .get_stream(&idle_stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .messages;
    assert_eq!(idle_messages, 0);

    // The slow watcher gets what was buffered for it, then a clear status.
    let mut received = 0;
    let end = loop {
        match tokio::time::timeout(DEADLINE, slow.next()).await.unwrap() {
            Some(Ok(_)) => received += 1,
            Some(Err(status)) => break status,
            None => panic!("the slow watcher ended without a status after {received}"),
        }
    };
    assert_eq!(end.code(), Code::ResourceExhausted, "{end:?}");
    assert!(end.message().contains("reconnect"), "{}", end.message());
    assert!(
        received < seen_a.changes,
        "{received} of {}",
        seen_a.changes
    );
}

fn crafted_change(a: &apb::Allocation, previous: State, event_id: &str) -> ev::Event {
    ev::Event {
        event_id: event_id.into(),
        allocation_id: a.allocation_id.clone(),
        tenant: a.tenant.clone(),
        aggregate_version: a.version,
        event_time: a.update_time,
        payload: Some(ev::event::Payload::AllocationStateChanged(
            ev::AllocationStateChanged {
                previous_state: previous as i32,
                allocation: Some(event_snapshot(a)),
                actor: String::new(),
            },
        )),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn usage_splits_at_the_month_boundary_and_is_priced_by_the_rate_card() {
    let dir = tempfile::tempdir().unwrap();
    let card = dir.path().join("rates.json");
    std::fs::write(
        &card,
        r#"{"currency": "EUR", "gpu_hour": {"A100": 2.5, "*": 1.0},
            "cpu_core_hour": 0.04, "memory_gib_hour": 0.005,
            "storage_gib_hour": 0.0001, "custom_unit_hour": {"SEAT": 0.5}}"#,
    )
    .unwrap();
    let tuning = Tuning {
        rate_card: Some(card),
        ..Tuning::default()
    };
    let mesh = Mesh::start_tuned(Backend::Sqlite, tuning).await;
    let t = "billing";
    let id = gpualloc_domain::AllocationId::new().to_string();
    // 2025-10-31T22:00Z requested, 23:00Z allocated, 2025-11-01T01:30Z
    // cancelled: one hour in October, one and a half in November.
    let (requested, allocated, cancelled) = (
        1_761_948_000_000_000,
        1_761_951_600_000_000,
        1_761_960_600_000_000,
    );
    let mut a = apb::Allocation {
        allocation_id: id.clone(),
        tenant: t.into(),
        resources: Some(rp::Resources {
            cpu_millis: 4_000,
            memory_mib: 8 * 1024,
            storage_gib: 100,
            gpus: 2,
            gpu_model: "A100".into(),
            custom: BTreeMap::from([("SEAT".to_owned(), 3)]),
        }),
        state: State::Pending as i32,
        version: 1,
        create_time: Some(time::to_timestamp(requested)),
        update_time: Some(time::to_timestamp(requested)),
        labels: BTreeMap::from([("cost-centre".to_owned(), "cc-42".to_owned())]),
        display_name: "nightly, \"big\"".into(),
        ..Default::default()
    };
    let v1 = crafted_change(&a, State::Unspecified, "usage-v1");
    a.state = State::Allocated as i32;
    a.version = 2;
    a.pool = "p".into();
    a.update_time = Some(time::to_timestamp(allocated));
    let v2 = crafted_change(&a, State::Pending, "usage-v2");
    a.state = State::Cancelled as i32;
    a.version = 3;
    a.reason = "done".into();
    a.update_time = Some(time::to_timestamp(cancelled));
    let v3 = crafted_change(&a, State::Allocated, "usage-v3");
    // Out of order and duplicated: the newest first, then the older ones
    // twice.
    for e in [&v3, &v1, &v2, &v2, &v1] {
        publish(&mesh, e).await;
    }
    drained(&mesh, "viewer").await;

    let view = wait_view(&mesh, t, &id, State::Cancelled).await;
    assert_eq!(
        view.allocation.unwrap().version,
        3,
        "a stale event moved the view"
    );
    let history = mesh
        .viewer()
        .list_allocation_history(tenant(
            t,
            vpb::ListAllocationHistoryRequest {
                allocation_id: id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .entries;
    let trail: Vec<_> = history
        .iter()
        .map(|e| (e.version, e.state, e.event_id.as_str()))
        .collect();
    assert_eq!(
        trail,
        [
            (1, State::Pending as i32, "usage-v1"),
            (2, State::Allocated as i32, "usage-v2"),
            (3, State::Cancelled as i32, "usage-v3")
        ]
    );

    let report = |month: &str| {
        let mut client = mesh.viewer();
        let month = month.to_owned();
        async move {
            client
                .get_usage_report(tenant(
                    t,
                    vpb::GetUsageReportRequest {
                        tenant: t.into(),
                        month,
                        ..Default::default()
                    },
                ))
                .await
        }
    };
    let close = |a: f64, b: f64| (a - b).abs() < 1e-6;
    for (month, hours) in [("2025-10", 1.0), ("2025-11", 1.5)] {
        let r = report(month).await.unwrap().into_inner();
        assert_eq!(r.lines.len(), 1, "{month}: {r:?}");
        let line = &r.lines[0];
        assert_eq!(
            (line.allocation_id.as_str(), line.pool.as_str()),
            (id.as_str(), "p")
        );
        assert!(close(line.hours, hours), "{month}: {line:?}");
        assert!(close(line.gpu_hours, 2.0 * hours));
        assert_eq!(line.gpu_model, "A100");
        assert!(close(line.cpu_core_hours, 4.0 * hours));
        assert!(close(line.memory_gib_hours, 8.0 * hours));
        assert!(close(line.storage_gib_hours, 100.0 * hours));
        assert!(close(line.custom_unit_hours["SEAT"], 3.0 * hours));
        assert_eq!(r.gpu_hours.len(), 1);
        assert_eq!(r.gpu_hours[0].gpu_model, "A100");
        assert!(close(r.gpu_hours[0].hours, 2.0 * hours));
        // 2 GPU-h × 2.5 + 4 core-h × 0.04 + 8 GiB-h × 0.005
        // + 100 GiB-h × 0.0001 + 3 seat-h × 0.5, per hour.
        let per_hour = 5.0 + 0.16 + 0.04 + 0.01 + 1.5;
        // Costs are rounded to cents (docs/operations.md).
        let cents = |a: f64, b: f64| (a - b).abs() <= 0.005 + 1e-9;
        assert!(
            cents(r.total_cost, per_hour * hours),
            "{month}: {}",
            r.total_cost
        );
        assert!(cents(line.cost, per_hour * hours));
        assert_eq!(r.total_cost, line.cost, "the total is the sum of the lines");
        assert_eq!(r.currency, "EUR");
    }
    let empty = report("2025-12").await.unwrap().into_inner();
    assert!(empty.lines.is_empty() && empty.total_cost == 0.0);
    for bad in ["2025-13", "November"] {
        let err = report(bad).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument, "{bad:?}: {err:?}");
    }
    // No month: the current one.
    let current = report("").await.unwrap().into_inner();
    assert_eq!(
        current.month,
        gpualloc_viewer::usage::month_of(time::now_micros())
    );

    // Any range, with what each line counted, its labels and name; an
    // administrator without a tenant gets every tenant, and CSV.
    let range = |start: i64, end: i64, who: &str, format: vpb::ReportFormat| {
        let mut client = mesh.viewer();
        let request = vpb::GetUsageReportRequest {
            tenant: who.into(),
            start_time: Some(time::to_timestamp(start)),
            end_time: Some(time::to_timestamp(end)),
            format: format as i32,
            ..Default::default()
        };
        async move { client.get_usage_report(admin(request)).await }
    };
    let r = range(requested, cancelled + 1, t, vpb::ReportFormat::Unspecified)
        .await
        .unwrap()
        .into_inner();
    let line = &r.lines[0];
    assert!(close(line.hours, 2.5), "{line:?}");
    assert_eq!(line.start_time, Some(time::to_timestamp(allocated)));
    assert_eq!(line.end_time, Some(time::to_timestamp(cancelled)));
    assert_eq!(
        line.labels.get("cost-centre").map(String::as_str),
        Some("cc-42")
    );
    assert_eq!(line.display_name, "nightly, \"big\"");
    assert!(r.rounding.contains("0.001"), "{}", r.rounding);
    let all = range(requested, cancelled + 1, "", vpb::ReportFormat::Csv)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.tenants.len(), 1, "{all:?}");
    assert_eq!(all.tenants[0].tenant, t);
    assert!(close(all.total_cost, all.tenants[0].total_cost));
    let csv: Vec<&str> = all.csv.lines().collect();
    assert!(
        csv[0].starts_with("tenant,allocation_id,display_name"),
        "{}",
        all.csv
    );
    assert!(
        csv[1].starts_with(&format!("{t},{id},\"nightly, \"\"big\"\"\",p,A100,2025-10-31T23:00:00Z,2025-11-01T01:30:00Z,2.500,")),
        "{}",
        all.csv
    );
    assert!(csv[1].contains("cost-centre=cc-42"), "{}", all.csv);
    assert!(csv.last().unwrap().starts_with("*,TOTAL,"), "{}", all.csv);
    // A range that ends before it starts, or a month and a range at once.
    let err = range(cancelled, requested, t, vpb::ReportFormat::Unspecified)
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
}

#[derive(QueryableByName)]
struct Line {
    #[diesel(sql_type = Text)]
    j: String,
}

/// The read model as text, without the projection times (a rebuild
/// projects at another time, by design).
async fn read_model(db: &TestDb) -> Vec<String> {
    open_db(db)
        .await
        .read(|c| {
            let mut out = Vec::new();
            for sql in [
                "SELECT 'view|' || allocation_id || '|' || tenant || '|' || state || '|' || version \
                 || '|' || create_time || '|' || update_time || '|' || hold_position || '|' \
                 || hex(snapshot) || '|' || COALESCE(expire_time, '') AS j \
                 FROM allocation_views ORDER BY allocation_id",
                "SELECT 'history|' || allocation_id || '|' || version || '|' || event_id || '|' \
                 || tenant || '|' || previous_state || '|' || state || '|' || reason || '|' \
                 || change_time || '|' || hex(snapshot) AS j \
                 FROM allocation_history ORDER BY allocation_id, version",
                "SELECT 'quota|' || tenant || '|' || limits || '|' || version AS j \
                 FROM tenant_quota_views ORDER BY tenant",
            ] {
                out.extend(sql_query(sql).load::<Line>(c)?.into_iter().map(|l| l.j));
            }
            Ok::<_, DbError>(out)
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rebuild_from_the_stream_equals_the_incremental_read_model() {
    let mut mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 3)])).await;
    for t in ["red", "blue"] {
        set_quota(&mesh, t, gpus(10, "")).await;
    }
    // Grants, holds (the pool is small), cancels and admissions.
    let red = churn(&mesh, "red", 6).await.unwrap();
    let blue = churn(&mesh, "blue", 5).await.unwrap();
    set_quota(&mesh, "blue", gpus(12, "")).await;
    all_drained(&mesh).await;
    let before = read_model(&mesh.viewer_db).await;
    assert!(before.len() > red.len() + blue.len());

    mesh.viewer.stop().await;
    // An operator's command: the viewer's own NATS user may use only its
    // durable consumer, the rebuild reads the stream with an ordered one.
    let operator = gpualloc_e2e::as_nats_operator(mesh.viewer.common.clone());
    let done = gpualloc_viewer::rebuild(&operator).await.unwrap();
    let last = mesh
        .jetstream()
        .await
        .get_stream(&mesh.stream)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    assert_eq!(done.messages, last);
    assert_eq!(done.skipped, 0);
    let after = read_model(&mesh.viewer_db).await;
    let differ: Vec<_> = before
        .iter()
        .zip(&after)
        .filter(|(b, a)| b != a)
        .take(3)
        .collect();
    assert!(differ.is_empty(), "{differ:#?}");
    assert_eq!(before.len(), after.len());

    // The viewer resumes after the rebuild with new events only.
    mesh.viewer.start_again().await;
    mesh.viewer.wait_serving().await;
    let more = create(&mesh, "red", gpus(1, "A100")).await;
    wait_view(&mesh, "red", &more.allocation_id, State::Held).await;
    let summary = mesh
        .viewer()
        .get_tenant_summary(admin(vpb::GetTenantSummaryRequest {
            tenant: "red".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    let total: i64 = summary.counts.iter().map(|c| c.count).sum();
    assert_eq!(total as usize, red.len() + 1);
}

async fn page(
    mesh: &Mesh,
    t: &str,
    states: &[State],
    page_size: i32,
    token: &str,
) -> Result<vpb::ListAllocationViewsResponse, tonic::Status> {
    mesh.viewer()
        .list_allocation_views(tenant(
            t,
            vpb::ListAllocationViewsRequest {
                tenant: t.into(),
                states: states.iter().map(|s| *s as i32).collect(),
                page_size,
                page_token: token.into(),
                label_selector: String::new(),
            },
        ))
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn listings_page_newest_first_and_summaries_add_up() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 4)])).await;
    let t = "team";
    set_quota(&mesh, t, gpus(100, "")).await;
    set_quota(&mesh, "other", gpus(100, "")).await;
    create(&mesh, "other", gpus(1, "A100")).await;
    // Granted until the pool is full, then held; every other one is
    // cancelled.
    let mut ids = Vec::new();
    for _ in 0..10 {
        ids.push(create(&mesh, t, gpus(1, "A100")).await.allocation_id);
    }
    all_drained(&mesh).await;
    for id in ids.iter().step_by(2) {
        cancel(&mesh, t, id).await.unwrap();
    }
    all_drained(&mesh).await;
    for id in ids.iter().step_by(2) {
        wait_view(&mesh, t, id, State::Cancelled).await;
    }
    all_drained(&mesh).await;

    // Pages of 3, newest first; allocations created meanwhile do not
    // disturb the pages after the first (they sort before the cursor).
    let mut listed = Vec::new();
    let mut token = String::new();
    let mut pages = 0;
    loop {
        let p = page(&mesh, t, &[], 3, &token).await.unwrap();
        assert!(p.allocations.len() <= 3);
        listed.extend(p.allocations.into_iter().map(|v| v.allocation.unwrap()));
        pages += 1;
        if pages == 1 {
            create(&mesh, t, gpus(1, "A100")).await;
        }
        if p.next_page_token.is_empty() {
            break;
        }
        token = p.next_page_token;
    }
    assert_eq!(pages, 4);
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(
        listed
            .iter()
            .map(|a| a.allocation_id.clone())
            .collect::<Vec<_>>(),
        newest_first,
        "every allocation once, newest first"
    );
    assert!(listed.iter().all(|a| a.tenant == t));

    // Filtered by state.
    let views = current_versions(&mut mesh.viewer(), t).await;
    let held = page(&mesh, t, &[State::Held], 100, "").await.unwrap();
    let cancelled = page(&mesh, t, &[State::Cancelled, State::Expired], 100, "")
        .await
        .unwrap();
    assert_eq!(cancelled.allocations.len(), 5);
    assert!(
        held.allocations.iter().all(
            |v| v.allocation.as_ref().unwrap().state == State::Held as i32 && v.hold_position > 0
        )
    );

    // The summary agrees with the views.
    let summary = mesh
        .viewer()
        .get_tenant_summary(tenant(t, vpb::GetTenantSummaryRequest { tenant: t.into() }))
        .await
        .unwrap()
        .into_inner();
    let by_state: BTreeMap<i32, i64> = summary.counts.iter().map(|c| (c.state, c.count)).collect();
    assert_eq!(by_state.values().sum::<i64>() as usize, views.len());
    assert_eq!(by_state[&(State::Cancelled as i32)], 5);
    assert_eq!(
        by_state.get(&(State::Held as i32)).copied().unwrap_or(0) as usize,
        held.allocations.len()
    );
    let allocated = by_state[&(State::Allocated as i32)];
    // Four GPUs, one of them taken by the other tenant.
    assert_eq!(allocated, 3, "the pool is full: {by_state:?}");
    assert_eq!(summary.in_use.unwrap().gpus as i64, allocated);
    assert_eq!(summary.quota.unwrap().gpus, 100);

    // Bad requests are refused with the field named, and another tenant's
    // listing is refused.
    for (size, token, field) in [
        (-1, "", "page_size"),
        (100_000, "", "page_size"),
        (3, "garbage", "page_token"),
    ] {
        let err = page(&mesh, t, &[], size, token).await.unwrap_err();
        assert_eq!(err.code(), Code::InvalidArgument);
        let details = tonic_types::StatusExt::get_error_details(&err);
        let violations = details.bad_request().unwrap().field_violations.clone();
        assert_eq!(violations[0].field, field, "{err:?}");
    }
    let err = mesh
        .viewer()
        .list_allocation_views(tenant(
            "other",
            vpb::ListAllocationViewsRequest {
                tenant: t.into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
}
