//! The complete saga through the real mesh: the hold queue, cancellation
//! and compensation from every state, leases, approvals, custom resource
//! classes, the reconciler, and delivery faults (duplicates, re-ordering,
//! a replay of the outbox after the JetStream duplicate window).

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::{collections::BTreeMap, time::Duration};

use gpualloc_domain::time;
use gpualloc_e2e::{Backend, Mesh, Tuning, admin, fixtures::*, tenant};
use gpualloc_proto::{
    allocation::v1::{self as apb, State},
    events::v1 as ev,
    resourcepool::v1 as rp,
    viewer::v1 as vpb,
};
use gpualloc_storage::{Db, DbOptions, outbox};
use gpualloc_testkit::{TestDb, eventually};
use tonic::Code;

fn gpu_request(n: i32, model: &str, priority: i32) -> apb::CreateAllocationRequest {
    apb::CreateAllocationRequest {
        resources: Some(gpus(n, model)),
        priority,
        ..Default::default()
    }
}

async fn create_for(mesh: &Mesh, t: &str, mut r: apb::CreateAllocationRequest) -> apb::Allocation {
    r.tenant = t.into();
    create_request(mesh, t, r).await
}

async fn quota_with(mesh: &Mesh, t: &str, limits: rp::Resources, approval_above: rp::Resources) {
    mesh.pools()
        .set_tenant_quota(admin(rp::SetTenantQuotaRequest {
            tenant: t.into(),
            limits: Some(limits),
            approval_above: Some(approval_above),
            max_hold: None,
            update_mask: None,
        }))
        .await
        .unwrap();
}

async fn put_pool_with_hold(mesh: &Mesh, id: &str, capacity: rp::Capacity, max_hold: i64) {
    mesh.pools()
        .put_pool(admin(rp::PutPoolRequest {
            update_mask: None,
            pool: Some(rp::Pool {
                pool_id: id.into(),
                capacity: Some(capacity),
                max_hold: Some(seconds(max_hold)),
                ..Default::default()
            }),
        }))
        .await
        .unwrap();
}

fn a100_used(pool: &rp::Pool) -> i32 {
    pool.usage
        .as_ref()
        .and_then(|u| u.gpus_by_model.get("A100").copied())
        .unwrap_or(0)
}

fn custom_used(pool: &rp::Pool, class: &str) -> i64 {
    pool.usage
        .as_ref()
        .and_then(|u| u.custom.get(class).copied())
        .unwrap_or(0)
}

fn only_custom(class: &str, n: i64) -> rp::Capacity {
    rp::Capacity {
        custom: BTreeMap::from([(class.to_owned(), n)]),
        ..Default::default()
    }
}

/// How many times the pool released `id` (ReservationReleased events).
async fn releases(mesh: &Mesh, id: &str) -> usize {
    count(
        &mesh.pool_db,
        &format!(
            "SELECT COUNT(*) AS n FROM outbox WHERE subject LIKE '%saga.reservation.released' AND aggregate_id = '{id}'"
        ),
    )
    .await as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_hold_queue_admits_in_order_without_head_of_line_blocking() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "a100", gpu_capacity(&[("A100", 2)])).await;
    put_pool(&mesh, "h100", gpu_capacity(&[("H100", 1)])).await;
    set_quota(&mesh, "team", gpus(16, "")).await;
    let t = "team";

    let first = create_for(&mesh, t, gpu_request(2, "A100", 0)).await;
    wait_state(&mesh, t, &first.allocation_id, State::Allocated).await;
    let big = create_for(&mesh, t, gpu_request(2, "A100", 0)).await;
    let big_held = wait_state(&mesh, t, &big.allocation_id, State::Held).await;
    assert!(big_held.reason.contains("capacity"), "{}", big_held.reason);
    let urgent = create_for(&mesh, t, gpu_request(1, "A100", 5)).await;
    wait_state(&mesh, t, &urgent.allocation_id, State::Held).await;

    // Held A100 requests do not block another model.
    let other = create_for(&mesh, t, gpu_request(1, "H100", 0)).await;
    wait_state(&mesh, t, &other.allocation_id, State::Allocated).await;

    // The queue in admission order: priority first, then age.
    let held = list_held(&mesh, "").await;
    let order: Vec<(&str, i64)> = held
        .iter()
        .map(|h| (h.allocation_id.as_str(), h.position))
        .collect();
    assert_eq!(
        order,
        vec![
            (urgent.allocation_id.as_str(), 1),
            (big.allocation_id.as_str(), 2)
        ]
    );
    // Filtered by pool: both could only ever go on a100.
    assert_eq!(list_held(&mesh, "a100").await.len(), 2);
    assert!(list_held(&mesh, "h100").await.is_empty());

    // A release admits the urgent one; the big one does not fit the one GPU
    // left and keeps waiting without blocking anybody.
    cancel(&mesh, t, &first.allocation_id).await.unwrap();
    wait_state(&mesh, t, &first.allocation_id, State::Cancelled).await;
    wait_state(&mesh, t, &urgent.allocation_id, State::Allocated).await;
    let small = create_for(&mesh, t, gpu_request(1, "A100", 0)).await;
    wait_state(&mesh, t, &small.allocation_id, State::Allocated).await;
    assert_eq!(
        get(&mesh, t, &big.allocation_id).await.state,
        State::Held as i32
    );
    let held = list_held(&mesh, "").await;
    assert_eq!(held.len(), 1);
    assert_eq!(held[0].position, 1);

    // Raising capacity admits it.
    put_pool(&mesh, "a100", gpu_capacity(&[("A100", 4)])).await;
    let granted = wait_state(&mesh, t, &big.allocation_id, State::Allocated).await;
    assert_eq!(granted.pool, "a100");
    assert_eq!(a100_used(&get_pool(&mesh, "a100").await), 4);
    wait_view(&mesh, t, &big.allocation_id, State::Allocated).await;
    assert!(list_held(&mesh, "").await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hold_past_the_pools_maximum_is_rejected_with_a_reason() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    put_pool_with_hold(&mesh, "small", gpu_capacity(&[("A100", 1)]), 1).await;
    set_quota(&mesh, "team", gpus(4, "")).await;
    let a = create_for(&mesh, "team", gpu_request(1, "A100", 0)).await;
    wait_state(&mesh, "team", &a.allocation_id, State::Allocated).await;
    let b = create_for(&mesh, "team", gpu_request(1, "A100", 0)).await;
    wait_state(&mesh, "team", &b.allocation_id, State::Held).await;
    let deadline = list_held(&mesh, "").await[0].hold_deadline;
    assert!(deadline.is_some(), "a held request shows its deadline");

    let rejected = wait_state(&mesh, "team", &b.allocation_id, State::Rejected).await;
    assert!(
        rejected.reason.contains("maximum hold"),
        "{}",
        rejected.reason
    );
    wait_view(&mesh, "team", &b.allocation_id, State::Rejected).await;
    // Its quota is free again; the granted one is untouched.
    let q = mesh
        .pools()
        .get_tenant_quota(admin(rp::GetTenantQuotaRequest {
            tenant: "team".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(q.held.unwrap_or_default().gpus, 0);
    assert_eq!(q.usage.unwrap_or_default().gpus, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_works_from_every_state_and_releases_once() {
    let mut mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 2)])).await;
    let mut limits = gpus(8, "");
    limits.cpu_millis = 64_000;
    let threshold = rp::Resources {
        cpu_millis: 16_000,
        ..Default::default()
    };
    quota_with(&mesh, "team", limits, threshold).await;
    let t = "team";
    let mut large = gpu_request(1, "", 0);
    large.resources.as_mut().unwrap().cpu_millis = 32_000;

    // ALLOCATED: the capacity comes back.
    let allocated = create_for(&mesh, t, gpu_request(2, "A100", 0)).await;
    wait_state(&mesh, t, &allocated.allocation_id, State::Allocated).await;
    // HELD: behind it.
    let held = create_for(&mesh, t, gpu_request(1, "A100", 0)).await;
    wait_state(&mesh, t, &held.allocation_id, State::Held).await;
    // AWAITING_APPROVAL: above the CPU threshold.
    let awaiting = create_for(&mesh, t, large.clone()).await;
    assert_eq!(awaiting.state, State::AwaitingApproval as i32);

    let c = cancel(&mesh, t, &held.allocation_id).await.unwrap();
    assert_eq!(c.state, State::Cancelling as i32);
    wait_state(&mesh, t, &held.allocation_id, State::Cancelled).await;

    // Nothing was asked of the pool yet: cancelled at once.
    let c = cancel(&mesh, t, &awaiting.allocation_id).await.unwrap();
    assert_eq!(c.state, State::Cancelled as i32);

    let c = cancel(&mesh, t, &allocated.allocation_id).await.unwrap();
    assert_eq!(c.state, State::Cancelling as i32);
    // Cancelling again while it is under way, and after: no-ops.
    let again = cancel(&mesh, t, &allocated.allocation_id).await.unwrap();
    assert!(matches!(
        State::try_from(again.state).unwrap(),
        State::Cancelling | State::Cancelled
    ));
    let done = wait_state(&mesh, t, &allocated.allocation_id, State::Cancelled).await;
    let again = cancel(&mesh, t, &allocated.allocation_id).await.unwrap();
    assert_eq!(again.version, done.version, "a second cancel moved it");
    assert_eq!(a100_used(&get_pool(&mesh, "p").await), 0);

    // PENDING: the pool is down, the request is accepted, then cancelled
    // before the pool ever saw it.
    mesh.pool.stop().await;
    let pending = create_for(&mesh, t, gpu_request(1, "A100", 0)).await;
    assert_eq!(pending.state, State::Pending as i32);
    let c = cancel(&mesh, t, &pending.allocation_id).await.unwrap();
    assert_eq!(c.state, State::Cancelling as i32);
    mesh.pool.start_again().await;
    mesh.pool.wait_serving().await;
    wait_state(&mesh, t, &pending.allocation_id, State::Cancelled).await;
    wait_view(&mesh, t, &pending.allocation_id, State::Cancelled).await;
    all_drained(&mesh).await;
    assert_eq!(
        a100_used(&get_pool(&mesh, "p").await),
        0,
        "a cancelled request was granted"
    );

    // A terminal allocation that was not cancelled refuses clearly.
    let rejected = create_for(&mesh, t, large).await;
    mesh.allocations()
        .reject_allocation(admin(apb::RejectAllocationRequest {
            allocation_id: rejected.allocation_id.clone(),
            reason: "not this month".into(),
        }))
        .await
        .unwrap();
    let err = cancel(&mesh, t, &rejected.allocation_id).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    // Each cancelled reservation was released exactly once.
    for id in [&allocated.allocation_id, &held.allocation_id] {
        assert_eq!(releases(&mesh, id).await, 1, "releases of {id}");
    }
    // The viewer's audit trail shows the compensation.
    let history = mesh
        .viewer()
        .list_allocation_history(tenant(
            t,
            vpb::ListAllocationHistoryRequest {
                allocation_id: allocated.allocation_id.clone(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let states: Vec<i32> = history.entries.iter().map(|e| e.state).collect();
    assert_eq!(
        states,
        vec![
            State::Pending as i32,
            State::Allocated as i32,
            State::Cancelling as i32,
            State::Cancelled as i32
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leases_expire_also_when_the_pool_was_down_at_the_time() {
    let mut mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 2)])).await;
    set_quota(&mesh, "team", gpus(4, "")).await;
    let t = "team";

    let mut r = gpu_request(1, "A100", 0);
    r.lease = Some(seconds(1));
    let a = create_for(&mesh, t, r.clone()).await;
    // A one-second lease may be over before a busy machine looks: granted
    // means ALLOCATED or already EXPIRED.
    let granted = eventually(SETTLE, "the one-second lease granted", || async {
        let now = get(&mesh, t, &a.allocation_id).await;
        (now.state == State::Allocated as i32 || now.state == State::Expired as i32).then_some(now)
    })
    .await;
    let expire = time::from_timestamp(granted.expire_time.as_ref().unwrap());
    let created = time::from_timestamp(granted.create_time.as_ref().unwrap());
    assert!(expire - created >= 1_000_000, "lease shorter than asked");
    let expired = wait_state(&mesh, t, &a.allocation_id, State::Expired).await;
    assert!(expired.reason.contains("lease"), "{}", expired.reason);
    wait_view(&mesh, t, &a.allocation_id, State::Expired).await;
    assert_eq!(a100_used(&get_pool(&mesh, "p").await), 0);

    // The pool is down when the lease ends: it releases on restart. The
    // lease is long enough to stop the pool before it ends, even when busy.
    r.lease = Some(seconds(3));
    let b = create_for(&mesh, t, r).await;
    let granted = wait_state(&mesh, t, &b.allocation_id, State::Allocated).await;
    mesh.pool.stop().await;
    let expire = time::from_timestamp(granted.expire_time.as_ref().unwrap());
    // Waiting for the wall clock to pass the lease end is the scenario
    // itself, not synchronisation with another task.
    let left = (expire - time::now_micros()).max(0) as u64;
    tokio::time::sleep(Duration::from_micros(left) + Duration::from_millis(200)).await;
    assert_eq!(
        get(&mesh, t, &b.allocation_id).await.state,
        State::Allocated as i32
    );
    mesh.pool.start_again().await;
    wait_state(&mesh, t, &b.allocation_id, State::Expired).await;
    assert_eq!(a100_used(&get_pool(&mesh, "p").await), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn large_requests_wait_for_an_administrator() {
    let mut mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 8)])).await;
    quota_with(&mesh, "team", gpus(16, ""), gpus(2, "")).await;
    let t = "team";

    let big = create_for(&mesh, t, gpu_request(4, "A100", 0)).await;
    assert_eq!(big.state, State::AwaitingApproval as i32);
    wait_view(&mesh, t, &big.allocation_id, State::AwaitingApproval).await;
    assert_eq!(
        a100_used(&get_pool(&mesh, "p").await),
        0,
        "capacity taken before approval"
    );
    // A tenant cannot approve its own request.
    let err = mesh
        .allocations()
        .approve_allocation(tenant(
            t,
            apb::ApproveAllocationRequest {
                allocation_id: big.allocation_id.clone(),
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);

    let approved = mesh
        .allocations()
        .approve_allocation(admin(apb::ApproveAllocationRequest {
            allocation_id: big.allocation_id.clone(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(approved.state, State::Pending as i32);
    wait_state(&mesh, t, &big.allocation_id, State::Allocated).await;
    assert_eq!(a100_used(&get_pool(&mesh, "p").await), 4);

    let no = create_for(&mesh, t, gpu_request(3, "", 0)).await;
    let rejected = mesh
        .allocations()
        .reject_allocation(admin(apb::RejectAllocationRequest {
            allocation_id: no.allocation_id.clone(),
            reason: "use the shared queue".into(),
        }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rejected.state, State::Rejected as i32);
    assert_eq!(rejected.reason, "use the shared queue");
    wait_view(&mesh, t, &no.allocation_id, State::Rejected).await;
    // Approving a rejected request is refused.
    let err = mesh
        .allocations()
        .approve_allocation(admin(apb::ApproveAllocationRequest {
            allocation_id: no.allocation_id.clone(),
        }))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // The pool is down at creation: accepted as PENDING, and the pool's
    // authoritative check sends it to approval afterwards.
    mesh.pool.stop().await;
    let late = create_for(&mesh, t, gpu_request(4, "A100", 0)).await;
    assert_eq!(late.state, State::Pending as i32);
    mesh.pool.start_again().await;
    wait_state(&mesh, t, &late.allocation_id, State::AwaitingApproval).await;
    mesh.allocations()
        .approve_allocation(admin(apb::ApproveAllocationRequest {
            allocation_id: late.allocation_id.clone(),
        }))
        .await
        .unwrap();
    wait_state(&mesh, t, &late.allocation_id, State::Allocated).await;
    assert_eq!(a100_used(&get_pool(&mesh, "p").await), 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn seat_booking_and_rentals_with_custom_classes() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    let t = "cinema-club";
    put_pool(&mesh, "hall-1", only_custom("SEAT", 5)).await;
    put_pool(&mesh, "bikes", only_custom("bike", 2)).await;
    set_quota(
        &mesh,
        t,
        rp::Resources {
            custom: BTreeMap::from([("SEAT".to_owned(), 10), ("bike".to_owned(), 4)]),
            ..Default::default()
        },
    )
    .await;

    // Seat booking: 5 seats, book 3, 2 remain.
    let three = create(&mesh, t, custom("SEAT", 3)).await;
    let granted = wait_state(&mesh, t, &three.allocation_id, State::Allocated).await;
    assert_eq!(granted.pool, "hall-1");
    assert_eq!(custom_used(&get_pool(&mesh, "hall-1").await, "SEAT"), 3);
    let check = mesh
        .pools()
        .check_quota(tenant(
            t,
            rp::CheckQuotaRequest {
                tenant: t.into(),
                resources: Some(custom("SEAT", 3)),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(check.verdict, rp::Verdict::InsufficientCapacity as i32);
    let two = create(&mesh, t, custom("SEAT", 2)).await;
    wait_state(&mesh, t, &two.allocation_id, State::Allocated).await;
    let waiting = create(&mesh, t, custom("SEAT", 3)).await;
    wait_state(&mesh, t, &waiting.allocation_id, State::Held).await;
    // Cancelling returns the seats, and the waiting booking gets them.
    cancel(&mesh, t, &three.allocation_id).await.unwrap();
    wait_state(&mesh, t, &three.allocation_id, State::Cancelled).await;
    wait_state(&mesh, t, &waiting.allocation_id, State::Allocated).await;
    assert_eq!(custom_used(&get_pool(&mesh, "hall-1").await, "SEAT"), 5);
    cancel(&mesh, t, &two.allocation_id).await.unwrap();
    wait_state(&mesh, t, &two.allocation_id, State::Cancelled).await;
    assert_eq!(custom_used(&get_pool(&mesh, "hall-1").await, "SEAT"), 3);
    // More seats than the hall has can never be booked.
    let err = mesh
        .allocations()
        .create_allocation(tenant(
            t,
            apb::CreateAllocationRequest {
                tenant: t.into(),
                resources: Some(custom("SEAT", 6)),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);

    // Rental: a bike for a one-second rental period comes back by itself.
    let rental = create_for(
        &mesh,
        t,
        apb::CreateAllocationRequest {
            resources: Some(custom("bike", 1)),
            lease: Some(seconds(1)),
            ..Default::default()
        },
    )
    .await;
    let out = wait_state(&mesh, t, &rental.allocation_id, State::Allocated).await;
    assert!(out.expire_time.is_some());
    assert_eq!(custom_used(&get_pool(&mesh, "bikes").await, "bike"), 1);
    wait_state(&mesh, t, &rental.allocation_id, State::Expired).await;
    wait_view(&mesh, t, &rental.allocation_id, State::Expired).await;
    assert_eq!(custom_used(&get_pool(&mesh, "bikes").await, "bike"), 0);
}

fn crafted(id: &str, tenant: &str, version: i64, payload: ev::event::Payload) -> ev::Event {
    ev::Event {
        event_id: format!("crafted-{}", gpualloc_domain::AllocationId::new()),
        allocation_id: id.into(),
        tenant: tenant.into(),
        aggregate_version: version,
        event_time: Some(time::to_timestamp(time::now_micros())),
        payload: Some(payload),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn out_of_order_and_stale_events_change_nothing() {
    let mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 4)])).await;
    set_quota(&mesh, "team", gpus(4, "")).await;
    let t = "team";

    // A stale grant after the release: the allocation stays cancelled and
    // the pool keeps its capacity.
    let a = create_for(&mesh, t, gpu_request(2, "A100", 0)).await;
    wait_state(&mesh, t, &a.allocation_id, State::Allocated).await;
    cancel(&mesh, t, &a.allocation_id).await.unwrap();
    let cancelled = wait_view(&mesh, t, &a.allocation_id, State::Cancelled).await;
    let stale = crafted(
        &a.allocation_id,
        t,
        1,
        ev::event::Payload::ReservationGranted(ev::ReservationGranted {
            pool_id: "p".into(),
            gpu_model: "A100".into(),
            expire_time: None,
        }),
    );
    publish(&mesh, &stale).await;
    // Even with a version from the future, a grant cannot revive a
    // terminal allocation.
    let future = crafted(
        &a.allocation_id,
        t,
        99,
        ev::event::Payload::ReservationGranted(ev::ReservationGranted {
            pool_id: "p".into(),
            gpu_model: "A100".into(),
            expire_time: None,
        }),
    );
    publish(&mesh, &future).await;
    all_drained(&mesh).await;
    let now = get(&mesh, t, &a.allocation_id).await;
    assert_eq!(now.state, State::Cancelled as i32);
    assert_eq!(now.version, cancelled.allocation.unwrap().version);
    assert_eq!(a100_used(&get_pool(&mesh, "p").await), 0);

    // A cancel that overtakes its request: the request is never granted.
    let id = gpualloc_domain::AllocationId::new().to_string();
    publish(
        &mesh,
        &crafted(
            &id,
            t,
            2,
            ev::event::Payload::AllocationCancelled(ev::AllocationCancelled {
                reason: "changed my mind".into(),
            }),
        ),
    )
    .await;
    drained(&mesh, "resource-pool").await;
    publish(
        &mesh,
        &crafted(
            &id,
            t,
            1,
            ev::event::Payload::AllocationRequested(ev::AllocationRequested {
                resources: Some(event_resources(gpus(1, "A100"))),
                priority: 0,
                lease: None,
                create_time: Some(time::to_timestamp(time::now_micros())),
                approved: false,
            }),
        ),
    )
    .await;
    all_drained(&mesh).await;
    assert_eq!(
        a100_used(&get_pool(&mesh, "p").await),
        0,
        "granted after cancel"
    );
    assert_eq!(
        count(
            &mesh.pool_db,
            &format!("SELECT COUNT(*) AS n FROM reservations WHERE allocation_id = '{id}' AND state = 'RELEASED'")
        )
        .await,
        1
    );

    // A decision for an allocation the allocation service never stored
    // changes nothing there.
    assert_eq!(
        count(
            &mesh.allocation_db,
            &format!("SELECT COUNT(*) AS n FROM allocations WHERE allocation_id = '{id}'")
        )
        .await,
        0
    );
}

/// Marks every outbox row of a service unpublished, as a relay restored from
/// a backup would see it.
async fn replay_outbox(db: &TestDb) -> usize {
    let handle = Db::connect(
        &db.url,
        DbOptions {
            pool_size: 1,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    handle
        .write(|c| Ok::<_, gpualloc_storage::DbError>(outbox::mark_all_unpublished(c)?))
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_outbox_replay_after_the_duplicate_window_changes_nothing() {
    let window = Duration::from_secs(1);
    let mesh = Mesh::start_custom(
        Backend::Sqlite,
        gpualloc_testkit::nats_url(),
        Tuning::default(),
        |c| c.duplicate_window = window,
    )
    .await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 2)])).await;
    set_quota(&mesh, "team", gpus(8, "")).await;
    let t = "team";
    let kept = create_for(&mesh, t, gpu_request(1, "A100", 0)).await;
    let gone = create_for(&mesh, t, gpu_request(1, "A100", 0)).await;
    let held = create_for(&mesh, t, gpu_request(2, "A100", 0)).await;
    wait_state(&mesh, t, &held.allocation_id, State::Held).await;
    cancel(&mesh, t, &gone.allocation_id).await.unwrap();
    wait_view(&mesh, t, &gone.allocation_id, State::Cancelled).await;
    wait_view(&mesh, t, &kept.allocation_id, State::Allocated).await;
    all_drained(&mesh).await;
    let before = events_per_allocation(&mesh).await;
    let states_before: Vec<apb::Allocation> = current(&mesh, t, &[&kept, &gone, &held]).await;

    // Past the window JetStream no longer de-duplicates by message id: the
    // consumers' inboxes must.
    let oldest = time::now_micros();
    eventually(
        Duration::from_secs(10),
        "duplicate window passed",
        || async { (time::now_micros() > oldest + window.as_micros() as i64).then_some(()) },
    )
    .await;
    let replayed = replay_outbox(&mesh.allocation_db).await + replay_outbox(&mesh.pool_db).await;
    assert!(replayed >= 10, "only {replayed} rows to replay");
    // The running relays find the rows on their next poll.
    eventually(SETTLE, "replayed rows published", || async {
        let n = count(
            &mesh.allocation_db,
            "SELECT COUNT(*) AS n FROM outbox WHERE published_at IS NULL",
        )
        .await
            + count(
                &mesh.pool_db,
                "SELECT COUNT(*) AS n FROM outbox WHERE published_at IS NULL",
            )
            .await;
        (n == 0).then_some(())
    })
    .await;
    all_drained(&mesh).await;

    let after = events_per_allocation(&mesh).await;
    for (id, (messages, ids)) in &after {
        let (old_messages, old_ids) = &before[id];
        assert!(messages > old_messages, "{id} was not replayed");
        assert_eq!(ids, old_ids, "the replay made {id} emit new events");
        // The bound: a create, a decision and a state change each, plus a
        // cancel, a release and their state changes.
        assert!(ids.len() <= 8, "{id} emitted {} events", ids.len());
    }
    let states_after = current(&mesh, t, &[&kept, &gone, &held]).await;
    assert_eq!(states_before, states_after);
    assert_eq!(a100_used(&get_pool(&mesh, "p").await), 1);
}

/// Current state of several allocations, in order.
async fn current(mesh: &Mesh, t: &str, of: &[&apb::Allocation]) -> Vec<apb::Allocation> {
    let mut out = Vec::new();
    for a in of {
        out.push(get(mesh, t, &a.allocation_id).await);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_reconciler_redrives_a_saga_whose_event_was_lost() {
    let mut mesh = Mesh::start_custom(
        Backend::Sqlite,
        gpualloc_testkit::nats_url(),
        Tuning {
            stuck_after: Duration::from_millis(500),
            ..Tuning::default()
        },
        |_| {},
    )
    .await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", 2)])).await;
    set_quota(&mesh, "team", gpus(8, "")).await;
    let t = "team";

    // The pool is down; the request is accepted and its event published...
    mesh.pool.stop().await;
    let a = create_for(&mesh, t, gpu_request(1, "A100", 0)).await;
    assert_eq!(a.state, State::Pending as i32);
    eventually(SETTLE, "request published", || async {
        let n = count(
            &mesh.allocation_db,
            "SELECT COUNT(*) AS n FROM outbox WHERE published_at IS NULL",
        )
        .await;
        (n == 0).then_some(())
    })
    .await;
    // ...and then lost by the broker.
    let js = mesh.jetstream().await;
    let stream = js.get_stream(&mesh.stream).await.unwrap();
    stream
        .purge()
        .filter(format!("{}.saga.allocation.>", mesh.prefix))
        .await
        .unwrap();
    mesh.pool.start_again().await;
    let done = wait_state(&mesh, t, &a.allocation_id, State::Allocated).await;
    assert_eq!(done.pool, "p");
    wait_view(&mesh, t, &a.allocation_id, State::Allocated).await;
    assert_eq!(a100_used(&get_pool(&mesh, "p").await), 1);
    // Re-driven a bounded number of times, not forever.
    all_drained(&mesh).await;
    let redrives = count(
        &mesh.allocation_db,
        &format!(
            "SELECT COUNT(*) AS n FROM outbox WHERE subject LIKE '%saga.allocation.requested' AND aggregate_id = '{}'",
            a.allocation_id
        ),
    )
    .await;
    assert!(
        (2..=4).contains(&redrives),
        "{redrives} requests for one allocation"
    );
}
