//! The resource pool's storage and decisions against both databases:
//! pools, quotas, usage counters, reservations, and the constraints that
//! hold invariant I1 even if the code were wrong.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::BTreeMap;

use diesel::{RunQueryDsl, sql_query};
use gpualloc_domain::{Capacity, Class, GpuModel, PoolId, Resources, TenantId, time};
use gpualloc_proto::events::v1 as ev;
use gpualloc_resource_pool::{
    Error, MIGRATIONS,
    admin::{self, PoolSpec, QuotaSpec},
    mask::{PoolMask, QuotaMask},
    saga, store,
};
use gpualloc_saga::{Emitter, Event, Payload};
use gpualloc_storage::{Db, DbOptions, outbox};

async fn open(url: &str) -> Db {
    let db = Db::connect(url, DbOptions::default()).await.unwrap();
    db.migrate(&[gpualloc_storage::MIGRATIONS, MIGRATIONS])
        .await
        .unwrap();
    db
}

/// Runs one operation the way the service does: one transaction, events
/// flushed to the outbox; returns the operation's result and the events.
async fn op<T: Send + 'static>(
    db: &Db,
    f: impl FnMut(&mut gpualloc_storage::DbConnection, &mut Emitter) -> Result<T, Error>
    + Send
    + 'static,
) -> Result<(T, Vec<Event>), Error> {
    op_at(db, time::now_micros(), f).await
}

/// [`op`] with the clock at `now`.
async fn op_at<T: Send + 'static>(
    db: &Db,
    now: i64,
    f: impl FnMut(&mut gpualloc_storage::DbConnection, &mut Emitter) -> Result<T, Error>
    + Send
    + 'static,
) -> Result<(T, Vec<Event>), Error> {
    let mut f = f;
    db.write(move |c| {
        let mut emit = Emitter::new("test", now, BTreeMap::new());
        let out = f(c, &mut emit)?;
        let events = emit.events().to_vec();
        emit.flush(c)?;
        Ok((out, events))
    })
    .await
}

fn a100(n: i64) -> Capacity {
    Capacity {
        cpu_millis: 16_000,
        gpus_by_model: BTreeMap::from([(GpuModel::parse("A100").unwrap(), n)]),
        ..Default::default()
    }
}

fn gpus(n: i64) -> Resources {
    Resources::from_lines([(&Class::Gpus, n)])
}

fn request(id: &str, tenant: &str, r: &Resources) -> Event {
    Event {
        event_id: format!("req-{id}"),
        allocation_id: id.into(),
        tenant: tenant.into(),
        aggregate_version: 1,
        event_time: None,
        payload: Some(Payload::AllocationRequested(ev::AllocationRequested {
            resources: Some(ev::Resources::from(r)),
            priority: 0,
            lease: None,
            create_time: Some(time::to_timestamp(time::now_micros())),
            approved: false,
        })),
    }
}

fn cancel(id: &str, tenant: &str) -> Event {
    Event {
        event_id: format!("cancel-{id}"),
        allocation_id: id.into(),
        tenant: tenant.into(),
        aggregate_version: 2,
        event_time: None,
        payload: Some(Payload::AllocationCancelled(ev::AllocationCancelled {
            reason: "test".into(),
        })),
    }
}

async fn apply(db: &Db, e: Event) -> Vec<Event> {
    op(db, move |c, emit| match &e.payload {
        Some(Payload::AllocationRequested(r)) => saga::on_requested(c, emit, &e, r),
        Some(Payload::AllocationCancelled(r)) => saga::on_cancelled(c, emit, &e, r),
        Some(Payload::AllocationRenewalRequested(r)) => saga::on_renewal_requested(c, emit, &e, r),
        _ => Ok(()),
    })
    .await
    .unwrap()
    .1
}

async fn setup(db: &Db, pool_gpus: i64, quota_gpus: i64) {
    op(db, move |c, emit| {
        admin::put_pool(
            c,
            emit,
            &PoolSpec {
                id: PoolId::parse("p").unwrap(),
                capacity: a100(pool_gpus),
                max_hold: None,
            },
            &PoolMask::Replace,
        )
    })
    .await
    .unwrap();
    op(db, move |c, emit| {
        admin::set_quota(
            c,
            emit,
            &QuotaSpec {
                tenant: TenantId::parse("t").unwrap(),
                limits: gpus(quota_gpus),
                approval_above: Resources::default(),
                max_hold: None,
            },
            &QuotaMask::Replace,
        )
    })
    .await
    .unwrap();
}

async fn usage(db: &Db) -> (i64, i64, i64) {
    db.read(|c| {
        let pools = store::pool_states(c)?;
        let used = pools[0].used.values().sum::<i64>()
            - pools[0]
                .used
                .get(&gpualloc_domain::Class::CpuMillis)
                .copied()
                .unwrap_or(0);
        let (_, t) = store::load_tenant(c, "t")?.unwrap();
        Ok::<_, Error>((
            used,
            t.charged[&gpualloc_domain::Class::Gpus],
            t.granted[&gpualloc_domain::Class::Gpus],
        ))
    })
    .await
    .unwrap()
}

fn kind(e: &Event) -> &'static str {
    gpualloc_saga::subjects::of(e.payload.as_ref().unwrap())
}

async fn grant_hold_release_and_counters(url: String) {
    let db = open(&url).await;
    setup(&db, 4, 6).await;

    let e = apply(&db, request("a1", "t", &gpus(3))).await;
    assert_eq!(kind(&e[0]), "saga.reservation.granted");
    assert_eq!(usage(&db).await, (3, 3, 3));

    // Capacity short, quota fine: held, charged to quota but not to the pool.
    let e = apply(&db, request("a2", "t", &gpus(2))).await;
    assert_eq!(kind(&e[0]), "saga.reservation.held");
    assert_eq!(usage(&db).await, (3, 5, 3));

    // Over quota: rejected, nothing charged.
    let e = apply(&db, request("a3", "t", &gpus(2))).await;
    assert_eq!(kind(&e[0]), "saga.reservation.rejected");
    assert_eq!(usage(&db).await, (3, 5, 3));

    // Releasing a1 admits a2 from the hold queue in the same transaction.
    let e = apply(&db, cancel("a1", "t")).await;
    let kinds: Vec<_> = e.iter().map(kind).collect();
    assert_eq!(
        kinds,
        ["saga.reservation.released", "saga.reservation.granted"]
    );
    assert_eq!(e[1].allocation_id, "a2");
    assert_eq!(usage(&db).await, (2, 2, 2));

    // Duplicates: a second request or cancel for the same allocation only
    // re-announces; counters do not move.
    let e = apply(&db, request("a2", "t", &gpus(2))).await;
    assert_eq!(kind(&e[0]), "saga.reservation.granted");
    let e = apply(&db, cancel("a1", "t")).await;
    assert_eq!(kind(&e[0]), "saga.reservation.released");
    assert_eq!(usage(&db).await, (2, 2, 2));

    // Outbox holds every event emitted, in order.
    let rows = db
        .read(|c| Ok::<_, Error>(outbox::pending(c, "test", 0, 1000)?))
        .await
        .unwrap();
    assert!(rows.len() >= 8, "{}", rows.len());
}

async fn a_cancel_before_its_request_wins(url: String) {
    let db = open(&url).await;
    setup(&db, 4, 4).await;
    let e = apply(&db, cancel("late", "t")).await;
    assert_eq!(kind(&e[0]), "saga.reservation.released");
    let e = apply(&db, request("late", "t", &gpus(1))).await;
    // The request finds the tombstone: never granted.
    assert_eq!(kind(&e[0]), "saga.reservation.released");
    assert_eq!(usage(&db).await, (0, 0, 0));
}

async fn shrinking_below_usage_is_refused(url: String) {
    let db = open(&url).await;
    setup(&db, 4, 4).await;
    apply(&db, request("a", "t", &gpus(3))).await;
    let err = op(&db, |c, emit| {
        admin::put_pool(
            c,
            emit,
            &PoolSpec {
                id: PoolId::parse("p").unwrap(),
                capacity: a100(2),
                max_hold: None,
            },
            &PoolMask::Replace,
        )
    })
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Precondition {
                reason: "CAPACITY_BELOW_USAGE",
                ..
            }
        ),
        "{err:?}"
    );
    let err = op(&db, |c, emit| {
        admin::set_quota(
            c,
            emit,
            &QuotaSpec {
                tenant: TenantId::parse("t").unwrap(),
                limits: gpus(2),
                approval_above: Resources::default(),
                max_hold: None,
            },
            &QuotaMask::Replace,
        )
    })
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Precondition {
                reason: "QUOTA_BELOW_USAGE",
                ..
            }
        ),
        "{err:?}"
    );
    let err = op(&db, |c, emit| {
        admin::delete_pool(c, emit, &PoolId::parse("p").unwrap())
    })
    .await
    .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Precondition {
                reason: "POOL_IN_USE",
                ..
            }
        ),
        "{err:?}"
    );
    assert_eq!(usage(&db).await, (3, 3, 3));
    // Growing is always fine.
    op(&db, |c, emit| {
        admin::put_pool(
            c,
            emit,
            &PoolSpec {
                id: PoolId::parse("p").unwrap(),
                capacity: a100(8),
                max_hold: None,
            },
            &PoolMask::Replace,
        )
    })
    .await
    .unwrap();
}

async fn the_database_refuses_over_allocation(url: String) {
    let db = open(&url).await;
    setup(&db, 4, 4).await;
    // Even a direct write that bypasses the code cannot pass capacity or
    // quota: the CHECK constraints are the last line of I1.
    let over_pool = db
        .write(|c| {
            Ok::<_, Error>(sql_query("UPDATE pool_resources SET used = capacity + 1").execute(c)?)
        })
        .await;
    assert!(over_pool.is_err(), "pool over capacity accepted");
    let over_quota = db
        .write(|c| {
            Ok::<_, Error>(
                sql_query(
                    "UPDATE tenant_usage SET charged = quota_limit + 1, granted = quota_limit + 1",
                )
                .execute(c)?,
            )
        })
        .await;
    assert!(over_quota.is_err(), "tenant over quota accepted");
    let negative = db
        .write(|c| Ok::<_, Error>(sql_query("UPDATE pool_resources SET used = -1").execute(c)?))
        .await;
    assert!(negative.is_err(), "negative usage accepted");
}

/// A masked update changes only what it names, against the stored value,
/// and still refuses to go below what is in use.
async fn masked_updates_change_only_what_they_name(url: String) {
    let db = open(&url).await;
    setup(&db, 4, 4).await;
    apply(&db, request("a", "t", &gpus(3))).await;
    let quota = |limits: Resources, max_hold: Option<i64>, paths: &[&str]| {
        let spec = QuotaSpec {
            tenant: TenantId::parse("t").unwrap(),
            limits,
            approval_above: gpus(2),
            max_hold,
        };
        let mask =
            QuotaMask::parse(&paths.iter().map(|p| (*p).to_owned()).collect::<Vec<_>>()).unwrap();
        move |c: &mut gpualloc_storage::DbConnection, emit: &mut Emitter| {
            admin::set_quota(c, emit, &spec, &mask)?;
            store::load_tenant(c, "t")
        }
    };
    // Storage and the hold limit set, GPUs untouched (still 4).
    let l = Resources::from_lines([(&Class::StorageGib, 500)]);
    let (row, state) = op(&db, quota(l, Some(7), &["limits.storage_gib", "max_hold"]))
        .await
        .unwrap()
        .0
        .unwrap();
    assert_eq!(state.limits.get(&Class::Gpus), Some(&4));
    assert_eq!(state.limits.get(&Class::StorageGib), Some(&500));
    assert_eq!(row.max_hold_micros, Some(7));
    assert_eq!(
        state.approval_above,
        Resources::default(),
        "not named: kept"
    );
    // GPUs below what is in use: refused, nothing changed.
    let err = op(&db, quota(gpus(1), None, &["limits.gpus"]))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            Error::Precondition {
                reason: "QUOTA_BELOW_USAGE",
                ..
            }
        ),
        "{err:?}"
    );
    // A mask on a quota that does not exist: not found, not created.
    let spec = QuotaSpec {
        tenant: TenantId::parse("nobody").unwrap(),
        limits: gpus(1),
        approval_above: Resources::default(),
        max_hold: None,
    };
    let mask = QuotaMask::parse(&["limits".to_owned()]).unwrap();
    let err = op(&db, move |c, emit| admin::set_quota(c, emit, &spec, &mask))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::NotFound { .. }), "{err:?}");
    // A pool's CPU changed, its GPUs kept.
    let mask = PoolMask::parse(&["capacity.cpu_millis".to_owned()]).unwrap();
    let pool = op(&db, move |c, emit| {
        admin::put_pool(
            c,
            emit,
            &PoolSpec {
                id: PoolId::parse("p").unwrap(),
                capacity: Capacity {
                    cpu_millis: 99_000,
                    ..Default::default()
                },
                max_hold: None,
            },
            &mask,
        )
    })
    .await
    .unwrap()
    .0;
    assert_eq!(pool.state.capacity.get(&Class::CpuMillis), Some(&99_000));
    assert_eq!(
        pool.state
            .capacity
            .get(&Class::GpusOf(GpuModel::parse("A100").unwrap())),
        Some(&4)
    );
}

fn renewal(id: &str, end: i64) -> Event {
    Event {
        event_id: format!("renew-{id}-{end}"),
        allocation_id: id.into(),
        tenant: "t".into(),
        aggregate_version: 3,
        event_time: None,
        payload: Some(Payload::AllocationRenewalRequested(
            ev::AllocationRenewalRequested {
                expire_time: Some(time::to_timestamp(end)),
            },
        )),
    }
}

fn renewed_to(e: &Event) -> (i64, i64) {
    match &e.payload {
        Some(Payload::ReservationRenewed(r)) => (
            e.aggregate_version,
            time::from_timestamp(r.expire_time.as_ref().unwrap()),
        ),
        other => panic!("not a renewal: {other:?}"),
    }
}

async fn a_renewed_lease_ends_later_and_never_earlier(url: String) {
    let db = open(&url).await;
    setup(&db, 4, 4).await;
    let mut req = request("r", "t", &gpus(2));
    if let Some(Payload::AllocationRequested(r)) = &mut req.payload {
        r.lease = Some(time::to_duration(60_000_000));
    }
    let e = apply(&db, req).await;
    let Some(Payload::ReservationGranted(g)) = &e[0].payload else {
        panic!("{e:?}")
    };
    let first_end = time::from_timestamp(g.expire_time.as_ref().unwrap());
    let new_end = first_end + 3_600_000_000;

    let e = apply(&db, renewal("r", new_end)).await;
    assert_eq!(e.len(), 1);
    assert_eq!(renewed_to(&e[0]), (2, new_end));
    // An end that is not later (a retry, a reordered older renewal) only
    // repeats where the lease stands.
    let e = apply(&db, renewal("r", first_end + 1)).await;
    assert_eq!(renewed_to(&e[0]), (2, new_end));

    // The sweeper follows the new end: nothing ends at the old one.
    let sweep = |now| {
        let db = db.clone();
        async move {
            op_at(&db, now, |c, emit| saga::sweep(c, emit, 100))
                .await
                .unwrap()
        }
    };
    let (swept, _) = sweep(first_end + 1_000_000).await;
    assert_eq!(swept.expired, 0);
    assert_eq!(usage(&db).await, (2, 2, 2));
    let (swept, e) = sweep(new_end).await;
    assert_eq!(swept.expired, 1);
    assert_eq!(kind(&e[0]), "saga.reservation.released");
    assert_eq!(usage(&db).await, (0, 0, 0));

    // Too late: the lease ended; the pool repeats the release.
    let e = apply(&db, renewal("r", new_end + 3_600_000_000)).await;
    assert_eq!(kind(&e[0]), "saga.reservation.released");
    assert_eq!(usage(&db).await, (0, 0, 0));
}

gpualloc_testkit::backend_tests!(
    a_renewed_lease_ends_later_and_never_earlier,
    grant_hold_release_and_counters,
    a_cancel_before_its_request_wins,
    shrinking_below_usage_is_refused,
    the_database_refuses_over_allocation,
    masked_updates_change_only_what_they_name,
);
