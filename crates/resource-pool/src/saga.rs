//! The resource pool's side of the saga: what it does with each event it
//! consumes (a request, a cancellation, a renewal), the hold queue's
//! admissions, and the sweeps that end leases and overdue holds. Each runs
//! inside one database transaction that first takes the placement lock, so
//! decisions are serialised across replicas and every check sees the
//! counters it changes; events are staged on the caller's [`Emitter`] and
//! commit with the change.

use std::collections::HashMap;

use gpualloc_domain::{Resources, TenantId, time};
use gpualloc_proto::events::v1 as ev;
use gpualloc_saga::{Emitter, Event, Payload};
use gpualloc_storage::{DbConnection, lock};

use crate::{
    Error,
    engine::{self, Verdict},
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
            return refuse(
                conn,
                emit,
                event,
                &info,
                &Resources::default(),
                "the request is malformed",
                ev::RejectCause::Unspecified,
                now,
            );
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
        Verdict::ExceedsQuota { reason, .. } => refuse(
            conn,
            emit,
            event,
            &info,
            &demand,
            &reason,
            ev::RejectCause::ExceedsQuota,
            now,
        )?,
        Verdict::Unsatisfiable(reason) => refuse(
            conn,
            emit,
            event,
            &info,
            &demand,
            &reason,
            ev::RejectCause::Unsatisfiable,
            now,
        )?,
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

/// Records a request as refused on arrival (nothing reserved) and says so:
/// reservation version 1.
#[allow(clippy::too_many_arguments)] // the request's parts, each used once
fn refuse(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    event: &Event,
    info: &RequestInfo,
    demand: &Resources,
    reason: &str,
    cause: ev::RejectCause,
    now: i64,
) -> Result<(), Error> {
    insert_row(
        conn,
        event,
        info,
        NewRow::ended(
            ReservationState::Rejected,
            demand,
            reason,
            cause.as_str_name(),
        ),
        now,
    )?;
    emit.emit(
        &event.allocation_id,
        &event.tenant,
        1,
        rejected(reason, cause),
    );
    Ok(())
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
