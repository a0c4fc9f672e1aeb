//! The allocation state machine. Every change is one transaction: the row
//! moves (guarded by its version), and the events it emits are staged in
//! the outbox. A transition that [`State::can_move_to`] does not allow is a
//! no-op that emits nothing; that rule alone makes duplicate, late and
//! re-ordered pool decisions harmless.

use std::{collections::BTreeMap, time::Duration};

use gpualloc_domain::{AllocationId, Backoff, GpuModel, Resources, State, TenantId, time};
use gpualloc_platform::Caller;
use gpualloc_proto::{events::v1 as ev, resourcepool::v1 as rp};
use gpualloc_saga::{Delivery, Emitter, Event, Outcome, Payload, version_gate};
use gpualloc_storage::DbConnection;
use serde::Serialize;

use crate::{
    Error,
    store::{self, AllocRow},
};

/// The largest allocation an event may carry (NATS takes 1 MiB by
/// default; the stream may be configured lower).
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// A validated CreateAllocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct NewAllocation {
    pub tenant: TenantId,
    pub resources: Resources,
    pub request_id: Option<String>,
    pub priority: i32,
    pub lease: Option<i64>,
    pub labels: BTreeMap<String, String>,
    /// Left out of the fingerprint when empty, so that requests made
    /// before names existed still match their replays.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub display_name: String,
}

impl NewAllocation {
    /// Canonical form of the parameters, compared when a request_id is
    /// reused.
    pub fn fingerprint(&self) -> String {
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// Returns the allocation an earlier call with the same idempotency key
/// created, or an error if the key was used with other parameters.
pub fn replay(conn: &mut DbConnection, new: &NewAllocation) -> Result<Option<AllocRow>, Error> {
    let Some(request_id) = &new.request_id else {
        return Ok(None);
    };
    match store::by_request_id(conn, new.tenant.as_str(), request_id)? {
        Some(row) if row.fingerprint == new.fingerprint() => Ok(Some(row)),
        Some(_) => Err(Error::IdempotencyKeyReused(request_id.clone())),
        None => Ok(None),
    }
}

/// Stores a new allocation: PENDING (and asks the pool) or
/// AWAITING_APPROVAL (and waits for an administrator).
pub fn create(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    new: &NewAllocation,
    awaiting_approval: bool,
) -> Result<AllocRow, Error> {
    if let Some(row) = replay(conn, new)? {
        return Ok(row);
    }
    let now = emit.now();
    let (state, reason) = if awaiting_approval {
        (
            State::AwaitingApproval,
            "above the tenant's approval threshold; waiting for an administrator",
        )
    } else {
        (State::Pending, "waiting for the resource pool's decision")
    };
    let row = AllocRow {
        allocation_id: AllocationId::new().to_string(),
        tenant: new.tenant.to_string(),
        state: state.as_str().to_owned(),
        reason: reason.to_owned(),
        resources: serde_json::to_string(&new.resources)
            .map_err(|e| Error::Invariant(e.to_string()))?,
        pool_id: None,
        priority: new.priority,
        request_id: new.request_id.clone(),
        fingerprint: new.fingerprint(),
        labels: serde_json::to_string(&new.labels).map_err(|e| Error::Invariant(e.to_string()))?,
        lease_micros: new.lease,
        version: 1,
        pool_version: 0,
        approved_time: None,
        create_time: now,
        update_time: now,
        expire_time: None,
        redrives: 0,
        redrive_time: None,
        display_name: new.display_name.clone(),
    };
    // Every change of the allocation travels whole in an event: one the
    // broker would refuse must not be accepted (the per-field limits keep
    // requests far below this; this holds if they grow).
    let size = prost::Message::encoded_len(&row.to_proto()?);
    if size > MAX_EVENT_BYTES {
        return Err(Error::Invalid(gpualloc_domain::Violations::single(
            "labels",
            format!("the allocation would encode to {size} bytes; at most {MAX_EVENT_BYTES}"),
        )));
    }
    store::insert(conn, &row)?;
    announce_change(emit, None, &row, "")?;
    count_transition(state);
    if state == State::Pending {
        request_placement(emit, &row)?;
    }
    Ok(row)
}

fn announce_change(
    emit: &mut Emitter,
    previous: Option<State>,
    row: &AllocRow,
    actor: &str,
) -> Result<(), Error> {
    emit.emit(
        &row.allocation_id,
        &row.tenant,
        row.version,
        Payload::AllocationStateChanged(ev::AllocationStateChanged {
            previous_state: previous.map(|s| s.to_proto() as i32).unwrap_or(0),
            allocation: Some(row.to_proto()?),
            actor: actor.to_owned(),
        }),
    );
    Ok(())
}

/// Emits AllocationRequested for a PENDING allocation (on creation,
/// approval, and when the reconciler re-drives a stuck saga).
pub fn request_placement(emit: &mut Emitter, row: &AllocRow) -> Result<(), Error> {
    emit.emit(
        &row.allocation_id,
        &row.tenant,
        row.version,
        Payload::AllocationRequested(ev::AllocationRequested {
            resources: Some(rp::Resources::from(&row.resources()?)),
            priority: row.priority,
            lease: row.lease_micros.map(time::to_duration),
            create_time: Some(time::to_timestamp(row.create_time)),
            approved: row.approved_time.is_some(),
        }),
    );
    Ok(())
}

/// Emits AllocationCancelled for a CANCELLING allocation.
pub fn request_release(emit: &mut Emitter, row: &AllocRow) {
    emit.emit(
        &row.allocation_id,
        &row.tenant,
        row.version,
        Payload::AllocationCancelled(ev::AllocationCancelled {
            reason: row.reason.clone(),
        }),
    );
}

/// Moves `row` to `to` (if allowed) and announces it; `edit` changes other
/// fields in the same write. Returns the new row.
fn transition(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    row: &AllocRow,
    to: State,
    reason: &str,
    edit: impl FnOnce(&mut AllocRow),
) -> Result<AllocRow, Error> {
    transition_by(conn, emit, row, to, reason, "", edit)
}

/// [`transition`] caused by a person: `actor` (the verified caller's
/// subject) goes into the event, and so into the viewer's history.
fn transition_by(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    row: &AllocRow,
    to: State,
    reason: &str,
    actor: &str,
    edit: impl FnOnce(&mut AllocRow),
) -> Result<AllocRow, Error> {
    let from = row.state()?;
    if !from.can_move_to(to) {
        return Err(Error::Invariant(format!(
            "{from} -> {to} is not a transition"
        )));
    }
    write_change(conn, emit, row, to, reason, actor, edit)
}

/// A change of an allocation that keeps its state (a lease renewal): a
/// new version, announced like a transition so that the viewer and the
/// history see it.
fn amend_by(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    row: &AllocRow,
    reason: &str,
    actor: &str,
    edit: impl FnOnce(&mut AllocRow),
) -> Result<AllocRow, Error> {
    let state = row.state()?;
    write_change(conn, emit, row, state, reason, actor, edit)
}

fn write_change(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    row: &AllocRow,
    to: State,
    reason: &str,
    actor: &str,
    edit: impl FnOnce(&mut AllocRow),
) -> Result<AllocRow, Error> {
    let from = row.state()?;
    let mut next = row.clone();
    next.state = to.as_str().to_owned();
    next.reason = reason.to_owned();
    next.version = row.version + 1;
    next.update_time = emit.now();
    // A new step of the saga starts with a fresh re-drive budget.
    next.redrives = 0;
    next.redrive_time = None;
    edit(&mut next);
    store::update(conn, &next, row.version)?;
    announce_change(emit, Some(from), &next, actor)?;
    if from != to {
        count_transition(to);
    }
    Ok(next)
}

/// `gpualloc_saga_transitions_total{state}`. Counted in the transaction: a
/// rare retried transaction counts twice, which a rate does not notice.
fn count_transition(to: State) {
    gpualloc_telemetry::METRICS
        .saga_transitions
        .get_or_create(&gpualloc_telemetry::labels([("state", to.as_str())]))
        .inc();
}

/// Loads an allocation the caller may see; others' are NOT_FOUND, as if
/// they did not exist.
pub fn load_for(
    conn: &mut DbConnection,
    id: &AllocationId,
    caller: &Caller,
) -> Result<AllocRow, Error> {
    let id = id.to_string();
    match store::get(conn, &id)? {
        Some(row)
            if caller.admin
                || caller
                    .tenant
                    .as_ref()
                    .is_some_and(|t| t.as_str() == row.tenant) =>
        {
            Ok(row)
        }
        _ => Err(Error::NotFound(id)),
    }
}

pub fn cancel(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    id: &AllocationId,
    caller: &Caller,
    reason: &str,
) -> Result<AllocRow, Error> {
    let row = load_for(conn, id, caller)?;
    let reason = if reason.is_empty() {
        "cancelled by the tenant"
    } else {
        reason
    };
    match row.state()? {
        State::Cancelling | State::Cancelled => Ok(row),
        // Nothing was asked of the pool yet.
        State::AwaitingApproval => transition_by(
            conn,
            emit,
            &row,
            State::Cancelled,
            reason,
            &caller.subject,
            |_| {},
        ),
        State::Pending | State::Held | State::Allocated => {
            let next = transition_by(
                conn,
                emit,
                &row,
                State::Cancelling,
                reason,
                &caller.subject,
                |_| {},
            )?;
            request_release(emit, &next);
            Ok(next)
        }
        state @ (State::Rejected | State::Expired) => Err(Error::WrongState {
            id: row.allocation_id,
            state,
            action: "cancel",
        }),
    }
}

/// Asks the pool to end the lease of an ALLOCATED allocation `lease` from
/// now. The allocation records the request (who asked, to when) at once;
/// its `expire_time` moves when the pool confirms ([`on_pool_event`]). A
/// renewal that would not move the end later changes nothing.
pub fn renew(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    id: &AllocationId,
    caller: &Caller,
    lease: i64,
) -> Result<AllocRow, Error> {
    let row = load_for(conn, id, caller)?;
    let state = row.state()?;
    if state != State::Allocated {
        return Err(Error::WrongState {
            id: row.allocation_id,
            state,
            action: "renew",
        });
    }
    let Some(current) = row.expire_time else {
        return Err(Error::NoLease(row.allocation_id));
    };
    let end = emit.now().saturating_add(lease);
    if end <= current {
        return Ok(row);
    }
    let reason = format!("lease renewal requested: to end at {}", time::rfc3339(end));
    let next = amend_by(conn, emit, &row, &reason, &caller.subject, |_| {})?;
    emit.emit(
        &next.allocation_id,
        &next.tenant,
        next.version,
        Payload::AllocationRenewalRequested(ev::AllocationRenewalRequested {
            expire_time: Some(time::to_timestamp(end)),
        }),
    );
    Ok(next)
}

fn decided_by(caller: &Caller) -> String {
    caller
        .tenant
        .as_ref()
        .map(|t| format!("admin ({t})"))
        .unwrap_or_else(|| "admin".into())
}

pub fn approve(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    id: &AllocationId,
    caller: &Caller,
) -> Result<AllocRow, Error> {
    let row = load_for(conn, id, caller)?;
    match row.state()? {
        State::AwaitingApproval => {
            let now = emit.now();
            store::record_decision(
                conn,
                &row.allocation_id,
                "APPROVED",
                "",
                &decided_by(caller),
                now,
            )?;
            let next = transition_by(
                conn,
                emit,
                &row,
                State::Pending,
                "approved; waiting for the resource pool's decision",
                &caller.subject,
                |r| r.approved_time = Some(now),
            )?;
            request_placement(emit, &next)?;
            Ok(next)
        }
        _ if row.approved_time.is_some() => Ok(row),
        state => Err(Error::WrongState {
            id: row.allocation_id,
            state,
            action: "approve",
        }),
    }
}

pub fn reject(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    id: &AllocationId,
    caller: &Caller,
    reason: &str,
) -> Result<AllocRow, Error> {
    let row = load_for(conn, id, caller)?;
    let reason = if reason.is_empty() {
        "rejected by an administrator"
    } else {
        reason
    };
    match row.state()? {
        State::AwaitingApproval => {
            store::record_decision(
                conn,
                &row.allocation_id,
                "REJECTED",
                reason,
                &decided_by(caller),
                emit.now(),
            )?;
            transition_by(
                conn,
                emit,
                &row,
                State::Rejected,
                reason,
                &caller.subject,
                |_| {},
            )
        }
        State::Rejected
            if store::decision(conn, &row.allocation_id)?.as_deref() == Some("REJECTED") =>
        {
            Ok(row)
        }
        state => Err(Error::WrongState {
            id: row.allocation_id,
            state,
            action: "reject",
        }),
    }
}

/// Checks a pool decision against the stored allocation before anything
/// is written: the allocation must exist, belong to the event's tenant,
/// and a granted pool must be a pool id. The allocation when it may be
/// applied, else what to do with the event.
fn validate_decision(event: &Event, row: Option<AllocRow>) -> Result<AllocRow, Outcome> {
    if AllocationId::parse(&event.allocation_id).is_err() {
        return Err(Outcome::poison(
            "invalid",
            format!(
                "allocation id {:?}",
                gpualloc_platform::truncate(&event.allocation_id, 64)
            ),
        ));
    }
    let Some(row) = row else {
        return Err(Outcome::poison(
            "unknown_aggregate",
            format!("no allocation {}", event.allocation_id),
        ));
    };
    if event.tenant != row.tenant {
        return Err(Outcome::poison(
            "mismatch",
            format!(
                "the event names tenant {:?}, allocation {} belongs to {}",
                gpualloc_platform::truncate(&event.tenant, 64),
                row.allocation_id,
                row.tenant
            ),
        ));
    }
    if let Some(Payload::ReservationGranted(g)) = &event.payload {
        if gpualloc_domain::PoolId::parse(g.pool_id.clone()).is_err() {
            return Err(Outcome::poison(
                "invalid",
                "a grant without a valid pool id",
            ));
        }
        if !g.gpu_model.is_empty() && GpuModel::parse(g.gpu_model.clone()).is_err() {
            return Err(Outcome::poison(
                "invalid",
                "a grant of an invalid GPU model",
            ));
        }
    }
    Ok(row)
}

/// Applies one decision of the resource pool. Stale decisions (a
/// reservation version already applied) and decisions that do not fit the
/// current state change nothing; a decision that jumps past the next
/// reservation version is parked until the versions between arrive.
pub fn on_pool_event(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    event: &Event,
    delivery: Delivery,
) -> Result<Outcome, Error> {
    let row = match validate_decision(event, store::get(conn, &event.allocation_id)?) {
        Ok(row) => row,
        Err(refusal) => return Ok(refusal),
    };
    let state = row.state()?;
    let v = event.aggregate_version;
    if let Some(Payload::ReservationNeedsApproval(p)) = &event.payload {
        if state == State::Pending && row.approved_time.is_none() {
            transition(conn, emit, &row, State::AwaitingApproval, &p.reason, |_| {})?;
        }
        return Ok(Outcome::Applied);
    }
    if v <= row.pool_version {
        return Ok(Outcome::Applied);
    }
    if let Some(wait) = version_gate(v, row.pool_version, delivery) {
        return Ok(wait);
    }
    if let Some(Payload::ReservationReleased(r)) = &event.payload
        && r.cause == ev::ReleaseCause::Expired as i32
        && matches!(state, State::Pending | State::Held)
    {
        // The grant and the end of its lease overtook each other (two
        // replicas of this consumer, or a lost grant): the allocation was
        // granted and has expired. Record both steps, so that the history
        // and the viewer show the grant; the late grant is then stale.
        let now = emit.now();
        let pool = r.pool_id.clone();
        let granted = transition(
            conn,
            emit,
            &row,
            State::Allocated,
            &format!("granted on pool {pool} (learned when its lease ended)"),
            |n| {
                n.pool_version = v;
                n.pool_id = Some(pool.clone());
                n.expire_time = Some(now);
            },
        )?;
        let reason = if r.reason.is_empty() {
            "lease expired".to_owned()
        } else {
            r.reason.clone()
        };
        transition(conn, emit, &granted, State::Expired, &reason, |_| {})?;
        return Ok(Outcome::Applied);
    }
    if let Some(Payload::ReservationRenewed(r)) = &event.payload {
        let end = r.expire_time.as_ref().map(time::from_timestamp);
        match end {
            Some(end) if state == State::Allocated && row.expire_time < Some(end) => {
                let reason = format!("lease renewed: it ends at {}", time::rfc3339(end));
                amend_by(conn, emit, &row, &reason, "", |n| {
                    n.pool_version = v;
                    n.expire_time = Some(end);
                })?;
            }
            _ => {
                let mut seen = row.clone();
                seen.pool_version = v;
                store::update(conn, &seen, row.version)?;
            }
        }
        return Ok(Outcome::Applied);
    }
    let target = match &event.payload {
        Some(Payload::ReservationGranted(g)) if matches!(state, State::Pending | State::Held) => {
            Some((State::Allocated, format!("granted on pool {}", g.pool_id)))
        }
        Some(Payload::ReservationHeld(h)) if state == State::Pending => {
            Some((State::Held, h.reason.clone()))
        }
        Some(Payload::ReservationRejected(r))
            if matches!(state, State::Pending | State::Held | State::Cancelling) =>
        {
            Some((State::Rejected, r.reason.clone()))
        }
        Some(Payload::ReservationReleased(r))
            if matches!(state, State::Allocated | State::Cancelling) =>
        {
            let to = if r.cause == ev::ReleaseCause::Expired as i32 {
                State::Expired
            } else {
                State::Cancelled
            };
            let reason = if r.reason.is_empty() {
                to.as_str().to_lowercase()
            } else {
                r.reason.clone()
            };
            Some((to, reason))
        }
        _ => None,
    };
    match target {
        Some((to, reason)) => {
            let resources = row.resources()?;
            transition(conn, emit, &row, to, &reason, |r| {
                r.pool_version = v;
                if let Some(Payload::ReservationGranted(g)) = &event.payload {
                    apply_grant(r, resources, g);
                }
            })?;
        }
        None => {
            // Not applicable in this state; remember the version so that an
            // even older decision cannot apply later.
            let mut seen = row.clone();
            seen.pool_version = v;
            store::update(conn, &seen, row.version)?;
        }
    }
    Ok(Outcome::Applied)
}

/// Records where and until when a grant holds; fills in the GPU model the
/// pool chose when any model was acceptable.
fn apply_grant(r: &mut AllocRow, mut resources: Resources, g: &ev::ReservationGranted) {
    r.pool_id = Some(g.pool_id.clone());
    r.expire_time = g.expire_time.as_ref().map(time::from_timestamp);
    if resources.gpu_model.is_none()
        && let Ok(model) = GpuModel::parse(g.gpu_model.clone())
    {
        resources.gpu_model = Some(model);
        if let Ok(json) = serde_json::to_string(&resources) {
            r.resources = json;
        }
    }
}

/// How the reconciler paces re-drives of one stuck saga step.
#[derive(Clone, Copy, Debug)]
pub struct RedrivePolicy {
    /// A step waiting on the pool longer than this is re-driven.
    pub stuck_after: i64,
    /// Longest pause between two re-drives of the same step.
    pub max_backoff: i64,
}

impl RedrivePolicy {
    /// When the re-drive after `redrives` earlier ones is due: the pause
    /// doubles each time, up to `max_backoff`.
    pub fn next_after(&self, now: i64, redrives: i32) -> i64 {
        let micros = |m: i64| Duration::from_micros(m.max(0) as u64);
        let pause = Backoff::new(micros(self.stuck_after), micros(self.max_backoff))
            .delay(redrives.max(0) as u32);
        now.saturating_add(pause.as_micros().min(i64::MAX as u128) as i64)
    }
}

/// Re-drives sagas stuck waiting on the pool: a PENDING allocation asks
/// for placement again, a CANCELLING one asks for release again. The pool
/// treats a request it has already decided as a request to repeat its
/// decision, so a re-drive is safe whether the original event, the
/// decision, or nothing was lost. Safe on every replica at once: each
/// re-drive is claimed with a guarded update. Returns how many it re-drove.
pub fn redrive(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    policy: RedrivePolicy,
    batch: i64,
) -> Result<usize, Error> {
    let now = emit.now();
    let stuck = store::waiting_since(conn, now - policy.stuck_after, now, batch)?;
    // A saga whose event is still in the outbox (the broker away) is not
    // stuck downstream: re-driving it would only pile more rows behind it.
    let ids: Vec<String> = stuck.iter().map(|r| r.allocation_id.clone()).collect();
    let unsent = gpualloc_storage::outbox::unpublished_among(conn, &ids)?;
    let mut n = 0;
    for row in stuck {
        if unsent.contains(&row.allocation_id) {
            continue;
        }
        if !store::claim_redrive(conn, &row, policy.next_after(now, row.redrives))? {
            continue;
        }
        tracing::warn!(
            allocation_id = %row.allocation_id,
            state = %row.state,
            redrives = row.redrives + 1,
            "saga stuck waiting on the pool; re-driving"
        );
        match row.state()? {
            State::Pending => request_placement(emit, &row)?,
            State::Cancelling => request_release(emit, &row),
            _ => continue,
        }
        n += 1;
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn an_unnamed_request_keeps_the_fingerprint_it_had_before_names() {
        let mut new = NewAllocation {
            tenant: TenantId::parse("t").unwrap(),
            resources: Resources::default(),
            request_id: Some("r".into()),
            priority: 0,
            lease: None,
            labels: BTreeMap::new(),
            display_name: String::new(),
        };
        // What rows stored before display names existed hold.
        let before = r#"{"tenant":"t","resources":{"cpu_millis":0,"memory_mib":0,"gpus":0,"gpu_model":null,"storage_gib":0,"custom":{}},"request_id":"r","priority":0,"lease":null,"labels":{}}"#;
        assert_eq!(new.fingerprint(), before);
        new.display_name = "run".into();
        assert_ne!(new.fingerprint(), before, "a name is a parameter");
    }
}
