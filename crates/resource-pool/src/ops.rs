//! The resource pool's transactional operations. Each runs inside one
//! database transaction that first takes the placement lock, so decisions
//! are serialised across replicas and every check sees the counters it
//! changes. Events are staged on the caller's [`Emitter`] and commit with
//! the change (transactional outbox).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use diesel::prelude::*;
use gpualloc_domain::{Capacity, Class, PoolId, Resources, TenantId, time};
use gpualloc_proto::{events::v1 as ev, resourcepool::v1 as pb};
use gpualloc_saga::{Emitter, Event, Payload};
use gpualloc_storage::{DbConnection, Native, lock};

use crate::{
    Error,
    engine::{self, Verdict},
    mask::{PoolMask, PoolParts, QuotaMask, QuotaParts},
    schema::{pool_resources, pools, tenant_quotas, tenant_usage},
    store::{self, NewReservation, ReservationRow, ReservationState},
};

/// What a new reservation row records.
struct NewRow<'a> {
    state: ReservationState,
    demand: &'a Resources,
    pool: Option<&'a str>,
    model: Option<&'a str>,
    hold_deadline: Option<i64>,
    expire_time: Option<i64>,
    reason: &'a str,
    outcome: Option<&'a str>,
}

impl<'a> NewRow<'a> {
    fn ended(
        state: ReservationState,
        demand: &'a Resources,
        reason: &'a str,
        outcome: &'a str,
    ) -> Self {
        NewRow {
            state,
            demand,
            pool: None,
            model: None,
            hold_deadline: None,
            expire_time: None,
            reason,
            outcome: Some(outcome),
        }
    }
}

/// The request fields that travel with every reservation row.
struct RequestInfo {
    priority: i32,
    request_time: i64,
    lease: Option<i64>,
}

fn insert_row(
    conn: &mut DbConnection,
    event: &Event,
    info: &RequestInfo,
    row: NewRow<'_>,
    now: i64,
) -> Result<(), Error> {
    store::insert_reservation(
        conn,
        &NewReservation {
            allocation_id: &event.allocation_id,
            tenant: &event.tenant,
            state: row.state.as_str(),
            demand: serde_json::to_string(row.demand).unwrap_or_else(|_| "{}".into()),
            pool_id: row.pool,
            gpu_model: row.model,
            priority: info.priority,
            request_time: info.request_time,
            lease_micros: info.lease,
            hold_deadline: row.hold_deadline,
            expire_time: row.expire_time,
            reason: row.reason,
            outcome: row.outcome,
            version: 1,
            create_time: now,
            update_time: now,
        },
    )
}

/// AllocationRequested: decide grant, hold or reject, exactly once per
/// allocation. A request for an allocation the pool already knows (a
/// re-drive by the allocation's reconciler, or a request overtaken by its
/// cancel) changes nothing; the pool re-announces its decision so that a
/// decision lost on the way is delivered again.
pub fn on_requested(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    event: &Event,
    req: &ev::AllocationRequested,
) -> Result<(), Error> {
    lock::acquire(conn, store::PLACEMENT_LOCK)?;
    let id = event.allocation_id.as_str();
    if let Some(r) = store::get_reservation(conn, id)? {
        return announce(conn, emit, &r);
    }
    let now = emit.now();
    let lease = req.lease.as_ref().map(time::parse_duration).transpose();
    let info = RequestInfo {
        priority: req.priority,
        request_time: req
            .create_time
            .as_ref()
            .map(time::from_timestamp)
            .unwrap_or(now),
        lease: lease.clone().ok().flatten(),
    };
    let tenant = TenantId::parse(event.tenant.clone());
    let demand = req.resources.clone().map(Resources::try_from).transpose();
    let (tenant, demand) = match (tenant, demand, lease) {
        (Ok(t), Ok(Some(d)), Ok(_)) if !d.is_empty() => (t, d),
        _ => {
            // Allocation validates before emitting; this is a defence
            // against a foreign publisher, not a normal path.
            let reason = "the request is malformed";
            let cause = ev::RejectCause::Unspecified;
            insert_row(
                conn,
                event,
                &info,
                NewRow::ended(
                    ReservationState::Rejected,
                    &Resources::default(),
                    reason,
                    cause.as_str_name(),
                ),
                now,
            )?;
            emit.emit(id, &event.tenant, 1, rejected(reason, cause));
            return Ok(());
        }
    };
    let pools = store::pool_states(conn)?;
    let tenant_state = store::load_tenant(conn, tenant.as_str())?.map(|(_, s)| s);
    let verdict = engine::decide(&demand, tenant_state.as_ref(), &pools);
    let over_threshold = tenant_state
        .as_ref()
        .map(|t| demand.above_threshold(&t.approval_above))
        .unwrap_or_default();
    if !req.approved
        && !over_threshold.is_empty()
        && matches!(verdict, Verdict::Allowed(_) | Verdict::InsufficientCapacity)
    {
        // Nothing is reserved: after approval a new request comes.
        let classes: Vec<String> = over_threshold.iter().map(ToString::to_string).collect();
        emit.emit(
            id,
            tenant.as_str(),
            0,
            Payload::ReservationNeedsApproval(ev::ReservationNeedsApproval {
                reason: format!(
                    "above the tenant's approval threshold in {}",
                    classes.join(", ")
                ),
            }),
        );
        return Ok(());
    }
    match verdict {
        Verdict::ExceedsQuota { reason, .. } => {
            let cause = ev::RejectCause::ExceedsQuota;
            insert_row(
                conn,
                event,
                &info,
                NewRow::ended(
                    ReservationState::Rejected,
                    &demand,
                    &reason,
                    cause.as_str_name(),
                ),
                now,
            )?;
            emit.emit(id, tenant.as_str(), 1, rejected(&reason, cause));
        }
        Verdict::Unsatisfiable(reason) => {
            let cause = ev::RejectCause::Unsatisfiable;
            insert_row(
                conn,
                event,
                &info,
                NewRow::ended(
                    ReservationState::Rejected,
                    &demand,
                    &reason,
                    cause.as_str_name(),
                ),
                now,
            )?;
            emit.emit(id, tenant.as_str(), 1, rejected(&reason, cause));
        }
        Verdict::Allowed(p) => {
            store::charge_tenant(conn, tenant.as_str(), &demand.quota_lines(), 1, true, true)?;
            store::take_pool(conn, &p.pool, &p.lines)?;
            let expire = info.lease.map(|l| now.saturating_add(l));
            let model = p.model.as_ref().map(|m| m.as_str());
            let row = NewRow {
                state: ReservationState::Granted,
                demand: &demand,
                pool: Some(p.pool.as_str()),
                model,
                hold_deadline: None,
                expire_time: expire,
                reason: "granted",
                outcome: None,
            };
            insert_row(conn, event, &info, row, now)?;
            emit.emit(
                id,
                tenant.as_str(),
                1,
                granted(p.pool.as_str(), model, expire),
            );
        }
        Verdict::InsufficientCapacity => {
            let tenant_state = tenant_state.unwrap_or_default();
            store::charge_tenant(conn, tenant.as_str(), &demand.quota_lines(), 1, true, false)?;
            let row = NewRow {
                state: ReservationState::Held,
                demand: &demand,
                pool: None,
                model: None,
                hold_deadline: engine::hold_deadline(now, &demand, &tenant_state, &pools),
                expire_time: None,
                reason: "waiting for capacity",
                outcome: None,
            };
            insert_row(conn, event, &info, row, now)?;
            let r = store::get_reservation(conn, id)?
                .ok_or_else(|| Error::Invariant(format!("reservation {id} vanished")))?;
            announce(conn, emit, &r)?;
        }
    }
    Ok(())
}

/// Emits the reservation's current decision (with its current version, so
/// the allocation applies it at most once).
fn announce(conn: &mut DbConnection, emit: &mut Emitter, r: &ReservationRow) -> Result<(), Error> {
    let payload = match r.state()? {
        ReservationState::Granted => granted(
            r.pool_id.as_deref().unwrap_or_default(),
            r.gpu_model.as_deref(),
            r.expire_time,
        ),
        ReservationState::Held => {
            let position = store::position(conn, r)?;
            Payload::ReservationHeld(ev::ReservationHeld {
                position,
                // The position changes as others join and leave the queue:
                // the reason says where to see it current.
                reason: "waiting for capacity in the hold queue; ResourcePoolService/ListHeld shows its current position and estimated start".into(),
            })
        }
        ReservationState::Rejected => rejected(
            &r.reason,
            r.outcome
                .as_deref()
                .and_then(ev::RejectCause::from_str_name)
                .unwrap_or(ev::RejectCause::Unspecified),
        ),
        ReservationState::Released => released(
            r.outcome
                .as_deref()
                .and_then(ev::ReleaseCause::from_str_name)
                .unwrap_or(ev::ReleaseCause::Cancelled),
            &r.reason,
            r.pool_id.as_deref().unwrap_or_default(),
        ),
    };
    emit.emit(&r.allocation_id, &r.tenant, r.version, payload);
    Ok(())
}

/// AllocationCancelled: release whatever is held for the allocation (the
/// compensation), or record that it must never be granted. Cancelling what
/// already ended re-announces how it ended.
pub fn on_cancelled(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    event: &Event,
    req: &ev::AllocationCancelled,
) -> Result<(), Error> {
    lock::acquire(conn, store::PLACEMENT_LOCK)?;
    let id = event.allocation_id.as_str();
    let now = emit.now();
    let reason = if req.reason.is_empty() {
        "cancelled".to_owned()
    } else {
        format!("cancelled: {}", req.reason)
    };
    let cause = ev::ReleaseCause::Cancelled;
    let Some(r) = store::get_reservation(conn, id)? else {
        // The cancel overtook its request: leave a released row so that the
        // request, when it arrives, is never granted.
        let reason = format!("{reason} (before the request reached the pool)");
        let info = RequestInfo {
            priority: 0,
            request_time: now,
            lease: None,
        };
        insert_row(
            conn,
            event,
            &info,
            NewRow::ended(
                ReservationState::Released,
                &Resources::default(),
                &reason,
                cause.as_str_name(),
            ),
            now,
        )?;
        emit.emit(id, &event.tenant, 1, released(cause, &reason, ""));
        return Ok(());
    };
    match r.state()? {
        ReservationState::Held => {
            store::charge_tenant(conn, &r.tenant, &r.demand()?.quota_lines(), -1, true, false)?;
            let v = store::move_reservation(
                conn,
                &r,
                ReservationState::Released,
                &reason,
                Some(cause.as_str_name()),
                None,
                now,
            )?;
            emit.emit(id, &r.tenant, v, released(cause, &reason, ""));
        }
        ReservationState::Granted => {
            release_granted(conn, &r)?;
            let v = store::move_reservation(
                conn,
                &r,
                ReservationState::Released,
                &reason,
                Some(cause.as_str_name()),
                None,
                now,
            )?;
            let pool = r.pool_id.as_deref().unwrap_or_default();
            emit.emit(id, &r.tenant, v, released(cause, &reason, pool));
            admit(conn, emit)?;
        }
        _ => announce(conn, emit, &r)?,
    }
    Ok(())
}

/// AllocationRenewalRequested: move the end of a granted lease later. The
/// pool owns lease ends (its sweeper releases them), so a renewal that
/// arrives after the lease ran out changes nothing: the release already
/// told the allocation. An end that is not later than the current one
/// changes nothing either (a retried or reordered renewal never shortens a
/// lease); both re-announce the current decision, so that a confirmation
/// lost on the way is delivered again.
pub fn on_renewal_requested(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    event: &Event,
    req: &ev::AllocationRenewalRequested,
) -> Result<(), Error> {
    lock::acquire(conn, store::PLACEMENT_LOCK)?;
    let Some(r) = store::get_reservation(conn, &event.allocation_id)? else {
        // A renewal is only sent for an ALLOCATED allocation, whose grant
        // this pool made; with no reservation there is nothing to extend.
        tracing::warn!(allocation_id = %event.allocation_id, "renewal for an unknown reservation ignored");
        return Ok(());
    };
    let wanted = req.expire_time.as_ref().map(time::from_timestamp);
    let end = match (r.state()?, r.expire_time, wanted) {
        (ReservationState::Granted, Some(current), Some(wanted)) if wanted > current => wanted,
        _ => return announce_renewal(conn, emit, &r),
    };
    let pool = r.pool_id.as_deref().unwrap_or_default();
    let placed = Some((pool, r.gpu_model.as_deref(), Some(end)));
    let v = store::move_reservation(
        conn,
        &r,
        ReservationState::Granted,
        "lease renewed",
        None,
        placed,
        emit.now(),
    )?;
    emit.emit(&r.allocation_id, &r.tenant, v, renewed(end));
    Ok(())
}

/// Re-announces a reservation's state in answer to a renewal: a granted
/// lease by its current end (the allocation applies it at most once),
/// anything else by its decision.
fn announce_renewal(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    r: &ReservationRow,
) -> Result<(), Error> {
    match (r.state()?, r.expire_time) {
        (ReservationState::Granted, Some(end)) => {
            emit.emit(&r.allocation_id, &r.tenant, r.version, renewed(end));
            Ok(())
        }
        _ => announce(conn, emit, r),
    }
}

fn renewed(end: i64) -> Payload {
    Payload::ReservationRenewed(ev::ReservationRenewed {
        expire_time: Some(time::to_timestamp(end)),
    })
}

fn release_granted(conn: &mut DbConnection, r: &ReservationRow) -> Result<(), Error> {
    let pool = r.pool_id.as_deref().ok_or_else(|| {
        Error::Invariant(format!(
            "granted reservation {} without pool",
            r.allocation_id
        ))
    })?;
    store::release_pool(conn, pool, &r.pool_lines()?)?;
    store::charge_tenant(conn, &r.tenant, &r.demand()?.quota_lines(), -1, true, true)
}

/// Admits held requests wherever they fit now (priority, then age; a
/// request that does not fit never blocks the others), and rejects held
/// requests that no pool could ever hold any more. Call with the placement
/// lock held, after anything that frees or changes capacity.
pub fn admit(conn: &mut DbConnection, emit: &mut Emitter) -> Result<usize, Error> {
    let rows = store::held(conn)?;
    if rows.is_empty() {
        return Ok(0);
    }
    let now = emit.now();
    let mut pools = store::pool_states(conn)?;
    let by_id: HashMap<&str, &ReservationRow> =
        rows.iter().map(|r| (r.allocation_id.as_str(), r)).collect();
    let mut queue = Vec::new();
    for h in store::held_queue(&rows)? {
        if engine::ever_fits(&h.demand, &pools) {
            queue.push(h);
            continue;
        }
        let r = by_id[h.allocation_id.as_str()];
        let reason = "no pool can hold this request any more (a pool was shrunk or deleted)";
        let cause = ev::RejectCause::Unsatisfiable;
        store::charge_tenant(conn, &r.tenant, &h.demand.quota_lines(), -1, true, false)?;
        let v = store::move_reservation(
            conn,
            r,
            ReservationState::Rejected,
            reason,
            Some(cause.as_str_name()),
            None,
            now,
        )?;
        emit.emit(&r.allocation_id, &r.tenant, v, rejected(reason, cause));
    }
    let admitted = engine::admit(&mut queue, &mut pools);
    for (id, p) in &admitted {
        let r = by_id[id.as_str()];
        store::take_pool(conn, &p.pool, &p.lines)?;
        store::charge_tenant(conn, &r.tenant, &r.demand()?.quota_lines(), 1, false, true)?;
        let expire = r.lease_micros.map(|l| now.saturating_add(l));
        let model = p.model.as_ref().map(|m| m.as_str());
        let placed = Some((p.pool.as_str(), model, expire));
        let v = store::move_reservation(
            conn,
            r,
            ReservationState::Granted,
            "granted from the hold queue",
            None,
            placed,
            now,
        )?;
        emit.emit(id, &r.tenant, v, granted(p.pool.as_str(), model, expire));
    }
    Ok(admitted.len())
}

/// What one sweep did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Swept {
    pub expired: usize,
    pub hold_timeouts: usize,
}

/// Releases leases that ended and rejects holds past their deadline,
/// whenever that was (also after downtime), then admits held requests.
pub fn sweep(conn: &mut DbConnection, emit: &mut Emitter, batch: i64) -> Result<Swept, Error> {
    lock::acquire(conn, store::PLACEMENT_LOCK)?;
    let now = emit.now();
    let mut swept = Swept::default();
    for r in store::expired_leases(conn, now, batch)? {
        release_granted(conn, &r)?;
        let reason = "lease expired";
        let cause = ev::ReleaseCause::Expired;
        let v = store::move_reservation(
            conn,
            &r,
            ReservationState::Released,
            reason,
            Some(cause.as_str_name()),
            None,
            now,
        )?;
        let pool = r.pool_id.as_deref().unwrap_or_default();
        emit.emit(
            &r.allocation_id,
            &r.tenant,
            v,
            released(cause, reason, pool),
        );
        swept.expired += 1;
    }
    for r in store::overdue_holds(conn, now, batch)? {
        store::charge_tenant(conn, &r.tenant, &r.demand()?.quota_lines(), -1, true, false)?;
        let reason = "waited longer than the maximum hold time";
        let cause = ev::RejectCause::HoldTimeout;
        let v = store::move_reservation(
            conn,
            &r,
            ReservationState::Rejected,
            reason,
            Some(cause.as_str_name()),
            None,
            now,
        )?;
        emit.emit(&r.allocation_id, &r.tenant, v, rejected(reason, cause));
        swept.hold_timeouts += 1;
    }
    if swept.expired > 0 {
        admit(conn, emit)?;
    }
    Ok(swept)
}

/// A pool as an administrator describes it.
#[derive(Clone, Debug)]
pub struct PoolSpec {
    pub id: PoolId,
    pub capacity: Capacity,
    pub max_hold: Option<i64>,
}

/// Creates a pool or replaces its capacity — or, with a mask, the fields
/// it names, merged under the placement lock with what is stored; refuses
/// to go below what is granted. Raising capacity admits held requests at
/// once.
pub fn put_pool(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    spec: &PoolSpec,
    mask: &PoolMask,
) -> Result<store::PoolRecord, Error> {
    lock::acquire(conn, store::PLACEMENT_LOCK)?;
    let now = emit.now();
    let id = spec.id.as_str();
    let existing = store::load_pools(conn)?
        .into_iter()
        .find(|p| p.row.pool_id == id);
    let current = existing.as_ref().map(|p| PoolParts {
        capacity: Capacity::from_lines(p.state.capacity.iter().map(|(c, v)| (c, *v))),
        max_hold: p.row.max_hold_micros,
    });
    let requested = PoolParts {
        capacity: spec.capacity.clone(),
        max_hold: spec.max_hold,
    };
    let Some(merged) = mask.apply(current.as_ref(), requested) else {
        return Err(Error::NotFound {
            kind: "pool",
            id: id.to_owned(),
        });
    };
    let spec = &PoolSpec {
        id: spec.id.clone(),
        capacity: merged.capacity,
        max_hold: merged.max_hold,
    };
    let new: BTreeMap<Class, i64> = spec.capacity.lines().into_iter().collect();
    match &existing {
        Some(p) => {
            let below: Vec<String> = p
                .state
                .used
                .iter()
                .filter(|(c, used)| **used > new.get(*c).copied().unwrap_or(0))
                .map(|(c, used)| {
                    format!(
                        "{c} (granted {used}, new capacity {})",
                        new.get(c).copied().unwrap_or(0)
                    )
                })
                .collect();
            if !below.is_empty() {
                return Err(Error::Precondition {
                    reason: "CAPACITY_BELOW_USAGE",
                    message: format!(
                        "pool {id} cannot shrink below what is granted on it: {}; cancel allocations first",
                        below.join(", ")
                    ),
                    metadata: HashMap::from([("pool_id".into(), id.into())]),
                });
            }
            diesel::update(pools::table.find(id))
                .set((
                    pools::max_hold_micros.eq(spec.max_hold),
                    pools::version.eq(pools::version + 1),
                    pools::update_time.eq(now),
                ))
                .execute_native(conn)?;
            let classes: BTreeSet<&Class> = p.state.capacity.keys().chain(new.keys()).collect();
            for class in classes {
                let name = class.to_string();
                let row = pool_resources::table
                    .filter(pool_resources::pool_id.eq(id))
                    .filter(pool_resources::class.eq(&name));
                match (p.state.capacity.contains_key(class), new.get(class)) {
                    (true, Some(cap)) => {
                        diesel::update(row)
                            .set(pool_resources::capacity.eq(cap))
                            .execute_native(conn)?;
                    }
                    (true, None) => {
                        diesel::delete(row).execute_native(conn)?;
                    }
                    (false, Some(cap)) => insert_pool_resource(conn, id, &name, *cap)?,
                    (false, None) => {}
                }
            }
        }
        None => {
            diesel::insert_into(pools::table)
                .values((
                    pools::pool_id.eq(id),
                    pools::max_hold_micros.eq(spec.max_hold),
                    pools::version.eq(1),
                    pools::create_time.eq(now),
                    pools::update_time.eq(now),
                ))
                .execute_native(conn)?;
            for (class, cap) in &new {
                insert_pool_resource(conn, id, &class.to_string(), *cap)?;
            }
        }
    }
    let record = store::load_pools(conn)?
        .into_iter()
        .find(|p| p.row.pool_id == id)
        .ok_or_else(|| Error::Invariant(format!("pool {id} vanished")))?;
    emit.emit(
        "",
        "",
        record.row.version,
        Payload::PoolChanged(ev::PoolChanged {
            pool: Some(pool_to_proto(&record)),
            deleted: false,
        }),
    );
    admit(conn, emit)?;
    Ok(record)
}

fn insert_pool_resource(
    conn: &mut DbConnection,
    pool: &str,
    class: &str,
    capacity: i64,
) -> Result<(), Error> {
    diesel::insert_into(pool_resources::table)
        .values((
            pool_resources::pool_id.eq(pool),
            pool_resources::class.eq(class),
            pool_resources::capacity.eq(capacity),
            pool_resources::used.eq(0),
        ))
        .execute_native(conn)?;
    Ok(())
}

/// Deletes an idle pool. Held requests that only it could hold are rejected.
pub fn delete_pool(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    id: &PoolId,
) -> Result<store::PoolRecord, Error> {
    lock::acquire(conn, store::PLACEMENT_LOCK)?;
    let record = store::load_pools(conn)?
        .into_iter()
        .find(|p| p.row.pool_id == id.as_str())
        .ok_or_else(|| Error::NotFound {
            kind: "pool",
            id: id.to_string(),
        })?;
    let granted = store::granted_on_pool(conn, id.as_str())?;
    if granted > 0 || record.state.used.values().any(|u| *u > 0) {
        return Err(Error::Precondition {
            reason: "POOL_IN_USE",
            message: format!(
                "pool {id} still has {granted} granted reservation(s); cancel them first"
            ),
            metadata: HashMap::from([
                ("pool_id".into(), id.to_string()),
                ("granted".into(), granted.to_string()),
            ]),
        });
    }
    diesel::delete(pool_resources::table.filter(pool_resources::pool_id.eq(id.as_str())))
        .execute_native(conn)?;
    diesel::delete(pools::table.find(id.as_str())).execute_native(conn)?;
    emit.emit(
        "",
        "",
        record.row.version + 1,
        Payload::PoolChanged(ev::PoolChanged {
            pool: Some(pool_to_proto(&record)),
            deleted: true,
        }),
    );
    admit(conn, emit)?;
    Ok(record)
}

/// A tenant's quota as an administrator sets it.
#[derive(Clone, Debug)]
pub struct QuotaSpec {
    pub tenant: TenantId,
    pub limits: Resources,
    pub approval_above: Resources,
    pub max_hold: Option<i64>,
}

/// Sets a tenant's quota — or, with a mask, the fields it names, merged
/// under the placement lock with what is stored; refuses limits below what
/// the tenant holds.
pub fn set_quota(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    spec: &QuotaSpec,
    mask: &QuotaMask,
) -> Result<(), Error> {
    lock::acquire(conn, store::PLACEMENT_LOCK)?;
    let now = emit.now();
    let tenant = spec.tenant.as_str();
    let existing = store::load_tenant(conn, tenant)?;
    let current = existing.as_ref().map(|(row, state)| QuotaParts {
        limits: Resources::from_lines(state.limits.iter().map(|(c, v)| (c, *v))),
        approval_above: state.approval_above.clone(),
        max_hold: row.max_hold_micros,
    });
    let requested = QuotaParts {
        limits: spec.limits.clone(),
        approval_above: spec.approval_above.clone(),
        max_hold: spec.max_hold,
    };
    let Some(merged) = mask.apply(current.as_ref(), requested) else {
        return Err(Error::NotFound {
            kind: "tenant quota",
            id: tenant.to_owned(),
        });
    };
    let spec = &QuotaSpec {
        tenant: spec.tenant.clone(),
        limits: merged.limits,
        approval_above: merged.approval_above,
        max_hold: merged.max_hold,
    };
    let new: BTreeMap<Class, i64> = spec.limits.quota_lines().into_iter().collect();
    let approval = serde_json::to_string(&spec.approval_above)
        .map_err(|e| Error::Invariant(format!("encoding approval_above: {e}")))?;
    let version = match &existing {
        Some((row, state)) => {
            let below: Vec<String> = state
                .charged
                .iter()
                .filter(|(c, used)| **used > new.get(*c).copied().unwrap_or(0))
                .map(|(c, used)| {
                    format!(
                        "{c} (in use {used}, new limit {})",
                        new.get(c).copied().unwrap_or(0)
                    )
                })
                .collect();
            if !below.is_empty() {
                return Err(Error::Precondition {
                    reason: "QUOTA_BELOW_USAGE",
                    message: format!(
                        "tenant {tenant} already uses more than the new limits allow: {}",
                        below.join(", ")
                    ),
                    metadata: HashMap::from([("tenant".into(), tenant.into())]),
                });
            }
            diesel::update(tenant_quotas::table.find(tenant))
                .set((
                    tenant_quotas::approval_above.eq(&approval),
                    tenant_quotas::max_hold_micros.eq(spec.max_hold),
                    tenant_quotas::version.eq(row.version + 1),
                    tenant_quotas::update_time.eq(now),
                ))
                .execute_native(conn)?;
            let classes: BTreeSet<&Class> = state.limits.keys().chain(new.keys()).collect();
            for class in classes {
                let name = class.to_string();
                let q = tenant_usage::table
                    .filter(tenant_usage::tenant.eq(tenant))
                    .filter(tenant_usage::class.eq(&name));
                match (state.limits.contains_key(class), new.get(class)) {
                    (true, Some(limit)) => {
                        diesel::update(q)
                            .set(tenant_usage::quota_limit.eq(limit))
                            .execute_native(conn)?;
                    }
                    (true, None) => {
                        diesel::delete(q).execute_native(conn)?;
                    }
                    (false, Some(limit)) => insert_usage(conn, tenant, &name, *limit)?,
                    (false, None) => {}
                }
            }
            row.version + 1
        }
        None => {
            diesel::insert_into(tenant_quotas::table)
                .values((
                    tenant_quotas::tenant.eq(tenant),
                    tenant_quotas::approval_above.eq(&approval),
                    tenant_quotas::max_hold_micros.eq(spec.max_hold),
                    tenant_quotas::version.eq(1),
                    tenant_quotas::update_time.eq(now),
                ))
                .execute_native(conn)?;
            for (class, limit) in &new {
                insert_usage(conn, tenant, &class.to_string(), *limit)?;
            }
            1
        }
    };
    emit.emit(
        "",
        tenant,
        version,
        Payload::TenantQuotaChanged(ev::TenantQuotaChanged {
            limits: Some(pb::Resources::from(&spec.limits)),
            approval_above: Some(pb::Resources::from(&spec.approval_above)),
        }),
    );
    Ok(())
}

fn insert_usage(
    conn: &mut DbConnection,
    tenant: &str,
    class: &str,
    limit: i64,
) -> Result<(), Error> {
    diesel::insert_into(tenant_usage::table)
        .values((
            tenant_usage::tenant.eq(tenant),
            tenant_usage::class.eq(class),
            tenant_usage::quota_limit.eq(limit),
            tenant_usage::charged.eq(0),
            tenant_usage::granted.eq(0),
        ))
        .execute_native(conn)?;
    Ok(())
}

pub fn pool_to_proto(p: &store::PoolRecord) -> pb::Pool {
    let capacity = Capacity::from_lines(p.state.capacity.iter().map(|(c, v)| (c, *v)));
    let usage = Capacity::from_lines(p.state.used.iter().map(|(c, v)| (c, *v)));
    pb::Pool {
        pool_id: p.row.pool_id.clone(),
        capacity: Some(pb::Capacity::from(&capacity)),
        usage: Some(pb::Capacity::from(&usage)),
        free: Some(free_of(&p.state)),
        max_hold: p.row.max_hold_micros.map(time::to_duration),
        version: p.row.version,
        create_time: Some(time::to_timestamp(p.row.create_time)),
        update_time: Some(time::to_timestamp(p.row.update_time)),
    }
}

/// Capacity minus usage for every class the pool has — a GPU model or
/// custom class that is fully used shows 0 rather than disappearing.
fn free_of(state: &engine::PoolState) -> pb::Capacity {
    let lines: Vec<(Class, i64)> = state
        .capacity
        .keys()
        .map(|c| (c.clone(), state.free(c).max(0)))
        .collect();
    let mut free = pb::Capacity::from(&Capacity::from_lines(lines.iter().map(|(c, v)| (c, *v))));
    for class in state.capacity.keys() {
        match class {
            Class::GpusOf(model) => {
                free.gpus_by_model.entry(model.to_string()).or_insert(0);
            }
            Class::Custom(name) => {
                free.custom.entry(name.to_string()).or_insert(0);
            }
            _ => {}
        }
    }
    free
}

fn rejected(reason: &str, cause: ev::RejectCause) -> Payload {
    Payload::ReservationRejected(ev::ReservationRejected {
        reason: reason.to_owned(),
        cause: cause as i32,
    })
}

fn released(cause: ev::ReleaseCause, reason: &str, pool: &str) -> Payload {
    Payload::ReservationReleased(ev::ReservationReleased {
        cause: cause as i32,
        reason: reason.to_owned(),
        pool_id: pool.to_owned(),
    })
}

fn granted(pool: &str, model: Option<&str>, expire: Option<i64>) -> Payload {
    Payload::ReservationGranted(ev::ReservationGranted {
        pool_id: pool.to_owned(),
        gpu_model: model.unwrap_or_default().to_owned(),
        expire_time: expire.map(time::to_timestamp),
    })
}
