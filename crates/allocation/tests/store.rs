//! The allocation state machine and its storage against both databases.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::BTreeMap;

use gpualloc_allocation::{
    Error, MIGRATIONS, PoolDecisions,
    machine::{Allocation, NewAllocation},
    ops, store,
};
use gpualloc_domain::{AllocationId, Class, Resources, State, TenantId, time};
use gpualloc_platform::Caller;
use gpualloc_proto::events::v1 as ev;
use gpualloc_saga::{Emitter, Event, Handler, Payload, subjects};
use gpualloc_storage::{Db, DbConnection, DbOptions};

async fn open(url: &str) -> Db {
    let db = Db::connect(url, DbOptions::default()).await.unwrap();
    db.migrate(&[gpualloc_storage::MIGRATIONS, MIGRATIONS])
        .await
        .unwrap();
    db
}

async fn op<T: Send + 'static>(
    db: &Db,
    mut f: impl FnMut(&mut DbConnection, &mut Emitter) -> Result<T, Error> + Send + 'static,
) -> Result<(T, Vec<Event>), Error> {
    db.write(move |c| {
        let mut emit = Emitter::new("test", time::now_micros(), BTreeMap::new());
        let out = f(c, &mut emit)?;
        let events = emit.events().to_vec();
        emit.flush(c)?;
        Ok((out, events))
    })
    .await
}

fn new(request_id: Option<&str>, gpus: i64) -> NewAllocation {
    NewAllocation {
        tenant: TenantId::parse("t").unwrap(),
        resources: Resources::from_lines([(&Class::Gpus, gpus)]),
        request_id: request_id.map(Into::into),
        priority: 0,
        lease: None,
        labels: BTreeMap::new(),
        display_name: String::new(),
    }
}

fn tenant() -> Caller {
    Caller::tenant(TenantId::parse("t").unwrap())
}

fn decision(id: &str, version: i64, payload: Payload) -> Event {
    Event {
        event_id: format!("{id}-{version}-{}", subjects::of(&payload)),
        allocation_id: id.into(),
        tenant: "t".into(),
        aggregate_version: version,
        event_time: None,
        payload: Some(payload),
    }
}

fn granted(pool: &str) -> Payload {
    Payload::ReservationGranted(ev::ReservationGranted {
        pool_id: pool.into(),
        gpu_model: "A100".into(),
        expire_time: None,
    })
}

fn released(cause: ev::ReleaseCause) -> Payload {
    Payload::ReservationReleased(ev::ReservationReleased {
        cause: cause as i32,
        reason: String::new(),
        pool_id: "p".into(),
    })
}

/// Applies a decision as it is once any parking is over (the order
/// tests here are about the state machine's guards).
async fn apply(db: &Db, e: Event) -> Vec<Event> {
    let late = gpualloc_saga::Delivery {
        delivered: gpualloc_saga::MAX_PARKED,
    };
    op(db, move |c, emit| PoolDecisions.handle(c, emit, &e, late))
        .await
        .unwrap()
        .1
}

async fn get(db: &Db, id: &str) -> Allocation {
    let id = AllocationId::parse(id).unwrap();
    db.read(move |c| store::get(c, &id)).await.unwrap().unwrap()
}

async fn create_and_replay(url: String) {
    let db = open(&url).await;
    let (row, events) = op(&db, |c, emit| {
        ops::create(c, emit, &new(Some("k1"), 2), false)
    })
    .await
    .unwrap();
    assert_eq!(row.state, State::Pending);
    let kinds: Vec<_> = events
        .iter()
        .map(|e| subjects::of(e.payload.as_ref().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [subjects::ALLOCATION_CHANGED, subjects::ALLOCATION_REQUESTED]
    );

    // Same key, same parameters: the same allocation, nothing emitted.
    let (again, events) = op(&db, |c, emit| {
        ops::create(c, emit, &new(Some("k1"), 2), false)
    })
    .await
    .unwrap();
    assert_eq!(again.id, row.id);
    assert!(events.is_empty());
    // Same key, other parameters: refused.
    let err = op(&db, |c, emit| {
        ops::create(c, emit, &new(Some("k1"), 3), false)
    })
    .await
    .unwrap_err();
    assert!(matches!(err, Error::IdempotencyKeyReused(_)));

    // Awaiting approval: nothing is asked of the pool.
    let (a, events) = op(&db, |c, emit| ops::create(c, emit, &new(None, 8), true))
        .await
        .unwrap();
    assert_eq!(a.state, State::AwaitingApproval);
    assert_eq!(events.len(), 1);
    let id = a.id;
    let (approved, events) = op(&db, move |c, emit| {
        ops::approve(c, emit, &id, &Caller::admin())
    })
    .await
    .unwrap();
    assert_eq!(approved.state, State::Pending);
    let Some(Payload::AllocationRequested(r)) = &events[1].payload else {
        panic!("{events:?}")
    };
    assert!(r.approved);
}

async fn the_state_machine_ignores_stale_and_duplicate_decisions(url: String) {
    let db = open(&url).await;
    let (row, _) = op(&db, |c, emit| ops::create(c, emit, &new(None, 1), false))
        .await
        .unwrap();
    let id = row.id.to_string();

    // Held (v1), then granted (v2) delivered first: the late HELD is stale.
    let e = apply(&db, decision(&id, 2, granted("p"))).await;
    assert_eq!(e.len(), 1);
    let held = Payload::ReservationHeld(ev::ReservationHeld {
        position: 1,
        reason: "wait".into(),
    });
    assert!(apply(&db, decision(&id, 1, held)).await.is_empty());
    let now = get(&db, &id).await;
    assert_eq!(
        (
            now.state.as_str(),
            now.version,
            now.pool.as_ref().map(|p| p.as_str())
        ),
        ("ALLOCATED", 2, Some("p"))
    );
    assert_eq!(
        now.resources.gpu_model().map(|m| m.as_str()),
        Some("A100"),
        "granted model recorded"
    );

    // The same grant again: nothing.
    assert!(apply(&db, decision(&id, 2, granted("p"))).await.is_empty());

    // Cancel, then the release; a stale grant after the release changes
    // nothing: granted and released never loop.
    let aid = AllocationId::parse(&id).unwrap();
    let (c, events) = op(&db, move |c, emit| {
        ops::cancel(c, emit, &aid, &tenant(), "")
    })
    .await
    .unwrap();
    assert_eq!(c.state, State::Cancelling);
    assert_eq!(events.len(), 2);
    apply(&db, decision(&id, 3, released(ev::ReleaseCause::Cancelled))).await;
    assert!(apply(&db, decision(&id, 2, granted("p"))).await.is_empty());
    assert!(apply(&db, decision(&id, 9, granted("p"))).await.is_empty());
    let end = get(&db, &id).await;
    assert_eq!((end.state.as_str(), end.version), ("CANCELLED", 4));

    // Cancelling again is a no-op; a terminal allocation other than
    // CANCELLED refuses.
    let aid = AllocationId::parse(&id).unwrap();
    let (again, events) = op(&db, move |c, emit| {
        ops::cancel(c, emit, &aid, &tenant(), "")
    })
    .await
    .unwrap();
    assert_eq!(again.version, 4);
    assert!(events.is_empty());
}

/// Held (v1), granted (v2) and expired (v3) at the pool; the expiry
/// overtakes the grant on the way. The allocation still ends EXPIRED, with
/// the grant in its history, and the late grant is stale.
async fn an_expiry_that_overtakes_its_grant_still_ends_the_allocation(url: String) {
    let db = open(&url).await;
    let (row, _) = op(&db, |c, emit| ops::create(c, emit, &new(None, 1), false))
        .await
        .unwrap();
    let id = row.id.to_string();
    let held = Payload::ReservationHeld(ev::ReservationHeld {
        position: 1,
        reason: "wait".into(),
    });
    apply(&db, decision(&id, 1, held)).await;
    let events = apply(&db, decision(&id, 3, released(ev::ReleaseCause::Expired))).await;
    let states: Vec<i32> = events
        .iter()
        .filter_map(|e| match &e.payload {
            Some(Payload::AllocationStateChanged(c)) => c.allocation.as_ref().map(|a| a.state),
            _ => None,
        })
        .collect();
    assert_eq!(
        states,
        [
            gpualloc_proto::allocation::v1::State::Allocated as i32,
            gpualloc_proto::allocation::v1::State::Expired as i32
        ]
    );
    assert!(apply(&db, decision(&id, 2, granted("p"))).await.is_empty());
    let end = get(&db, &id).await;
    assert_eq!(
        (
            end.state.as_str(),
            end.version,
            end.pool.as_ref().map(|p| p.as_str())
        ),
        ("EXPIRED", 4, Some("p"))
    );
}

async fn terminal_states_refuse_and_tenants_are_isolated(url: String) {
    let db = open(&url).await;
    let (row, _) = op(&db, |c, emit| ops::create(c, emit, &new(None, 1), false))
        .await
        .unwrap();
    let id = row.id.to_string();
    let rejected = Payload::ReservationRejected(ev::ReservationRejected {
        reason: "no".into(),
        cause: 1,
    });
    apply(&db, decision(&id, 1, rejected)).await;
    assert_eq!(get(&db, &id).await.state, State::Rejected);

    let aid = AllocationId::parse(&id).unwrap();
    let err = op(&db, move |c, emit| {
        ops::cancel(c, emit, &aid, &tenant(), "")
    })
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::WrongState {
                state: State::Rejected,
                ..
            }
        ),
        "{err:?}"
    );
    let err = op(&db, move |c, emit| {
        ops::approve(c, emit, &aid, &Caller::admin())
    })
    .await
    .unwrap_err();
    assert!(matches!(err, Error::WrongState { .. }), "{err:?}");

    // Another tenant cannot see or cancel it: it does not exist for them.
    let stranger = Caller::tenant(TenantId::parse("u").unwrap());
    let err = op(&db, move |c, emit| {
        ops::cancel(c, emit, &aid, &stranger, "")
    })
    .await
    .unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err:?}");

    // A lease ending moves ALLOCATED to EXPIRED.
    let (row, _) = op(&db, |c, emit| ops::create(c, emit, &new(None, 1), false))
        .await
        .unwrap();
    let id = row.id.to_string();
    apply(&db, decision(&id, 1, granted("p"))).await;
    apply(&db, decision(&id, 2, released(ev::ReleaseCause::Expired))).await;
    assert_eq!(get(&db, &id).await.state, State::Expired);
}

fn renewed(end: i64) -> Payload {
    Payload::ReservationRenewed(ev::ReservationRenewed {
        expire_time: Some(time::to_timestamp(end)),
    })
}

async fn renewals_are_asked_of_the_pool_and_applied_once(url: String) {
    let db = open(&url).await;
    let mut leased = new(None, 1);
    leased.lease = Some(60_000_000);
    let (row, _) = op(&db, move |c, emit| ops::create(c, emit, &leased, false))
        .await
        .unwrap();
    let id = row.id.to_string();
    let aid = AllocationId::parse(&id).unwrap();
    let renew = |lease: i64| {
        let db = db.clone();
        async move {
            op(&db, move |c, emit| {
                ops::renew(c, emit, &aid, &tenant(), lease)
            })
            .await
        }
    };
    // Not granted yet: nothing to renew.
    let err = renew(3_600_000_000).await.unwrap_err();
    assert!(
        matches!(
            err,
            Error::WrongState {
                state: State::Pending,
                ..
            }
        ),
        "{err:?}"
    );

    let first_end = time::now_micros() + 60_000_000;
    apply(
        &db,
        decision(
            &id,
            1,
            Payload::ReservationGranted(ev::ReservationGranted {
                pool_id: "p".into(),
                gpu_model: "A100".into(),
                expire_time: Some(time::to_timestamp(first_end)),
            }),
        ),
    )
    .await;
    let before = get(&db, &id).await;

    // A renewal that would not end it later changes nothing.
    let (same, events) = renew(1_000_000).await.unwrap();
    assert_eq!(same.version, before.version);
    assert!(events.is_empty());

    // The request: a new version naming who asked, and the ask to the pool.
    let (asked, events) = renew(3_600_000_000).await.unwrap();
    assert_eq!(asked.state, State::Allocated);
    assert_eq!(asked.version, before.version + 1);
    assert_eq!(
        asked.expire_time, before.expire_time,
        "not before the pool agrees"
    );
    assert!(
        asked.reason.starts_with("lease renewal requested"),
        "{}",
        asked.reason
    );
    let kinds: Vec<_> = events
        .iter()
        .map(|e| subjects::of(e.payload.as_ref().unwrap()))
        .collect();
    assert_eq!(
        kinds,
        [
            subjects::ALLOCATION_CHANGED,
            subjects::ALLOCATION_RENEWAL_REQUESTED
        ]
    );
    let Some(Payload::AllocationStateChanged(c)) = &events[0].payload else {
        panic!()
    };
    assert_eq!(c.actor, tenant().subject);
    let Some(Payload::AllocationRenewalRequested(r)) = &events[1].payload else {
        panic!()
    };
    let end = time::from_timestamp(r.expire_time.as_ref().unwrap());

    // The pool's confirmation moves the end, once.
    let events = apply(&db, decision(&id, 2, renewed(end))).await;
    let after = get(&db, &id).await;
    assert_eq!(after.expire_time, Some(end));
    assert_eq!(after.version, asked.version + 1);
    assert_eq!(events.len(), 1);
    assert!(apply(&db, decision(&id, 2, renewed(end))).await.is_empty());
    // An older confirmation never moves it back.
    assert!(
        apply(&db, decision(&id, 1, renewed(first_end)))
            .await
            .is_empty()
    );
    assert_eq!(get(&db, &id).await.expire_time, Some(end));

    // The lease ends: expired; renewing now is refused.
    apply(&db, decision(&id, 3, released(ev::ReleaseCause::Expired))).await;
    assert_eq!(get(&db, &id).await.state, State::Expired);
    let err = renew(3_600_000_000).await.unwrap_err();
    assert!(matches!(
        err,
        Error::WrongState {
            state: State::Expired,
            ..
        }
    ));

    // Granted without a lease: nothing to renew.
    let (plain, _) = op(&db, |c, emit| ops::create(c, emit, &new(None, 1), false))
        .await
        .unwrap();
    apply(&db, decision(&plain.id.to_string(), 1, granted("p"))).await;
    let pid = plain.id;
    let err = op(&db, move |c, emit| {
        ops::renew(c, emit, &pid, &tenant(), 3_600_000_000)
    })
    .await
    .unwrap_err();
    assert!(matches!(err, Error::NoLease(_)), "{err:?}");
}

gpualloc_testkit::backend_tests!(
    renewals_are_asked_of_the_pool_and_applied_once,
    create_and_replay,
    the_state_machine_ignores_stale_and_duplicate_decisions,
    an_expiry_that_overtakes_its_grant_still_ends_the_allocation,
    terminal_states_refuse_and_tenants_are_isolated,
);
