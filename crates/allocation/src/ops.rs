//! The allocation service's operations: each loads what it needs, asks
//! the state machine ([`crate::machine`]) what follows, and writes the
//! result in the caller's transaction — the allocation guarded by its
//! version, and the facts it announces staged in the outbox.

use std::time::Duration;

use gpualloc_domain::{AllocationId, Backoff, Caller, State};
use gpualloc_saga::{Delivery, Emitter, Outcome, version_gate};
use gpualloc_storage::DbConnection;

use crate::{
    Error,
    machine::{Allocation, NewAllocation, PoolDecision, Refusal, Step},
    store, wire,
};

/// The largest allocation an event may carry (NATS takes 1 MiB by
/// default; the stream may be configured lower).
pub const MAX_EVENT_BYTES: usize = 64 * 1024;

/// Returns the allocation an earlier call with the same idempotency key
/// created, or an error if the key was used with other parameters.
pub fn replay(conn: &mut DbConnection, new: &NewAllocation) -> Result<Option<Allocation>, Error> {
    let Some(request_id) = &new.request_id else {
        return Ok(None);
    };
    match store::by_request_id(conn, &new.tenant, request_id)? {
        Some(a) if a.fingerprint == new.fingerprint() => Ok(Some(a)),
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
) -> Result<Allocation, Error> {
    if let Some(a) = replay(conn, new)? {
        return Ok(a);
    }
    let (next, facts) = Allocation::create(AllocationId::new(), new, awaiting_approval, emit.now());
    // Every change of the allocation travels whole in an event: one the
    // broker would refuse must not be accepted (the per-field limits keep
    // requests far below this; this holds if they grow).
    let size = prost::Message::encoded_len(&wire::snapshot(&next));
    if size > MAX_EVENT_BYTES {
        return Err(Error::Invalid(gpualloc_domain::Violations::single(
            "labels",
            format!("the allocation would encode to {size} bytes; at most {MAX_EVENT_BYTES}"),
        )));
    }
    store::insert(conn, &next)?;
    announce(emit, &next, &facts);
    Ok(next)
}

/// Writes a step taken from `from` and stages what it announces; returns
/// the allocation as it now is.
fn commit(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    from: Allocation,
    step: Step,
) -> Result<Allocation, Error> {
    match step {
        Step::Same => Ok(from),
        Step::Next { next, facts } => {
            store::update(conn, &next, from.version)?;
            announce(emit, &next, &facts);
            Ok(next)
        }
    }
}

fn announce(emit: &mut Emitter, next: &Allocation, facts: &[crate::machine::Fact]) {
    for fact in facts {
        if let crate::machine::Fact::Changed {
            snapshot, previous, ..
        } = fact
            && *previous != Some(snapshot.state)
        {
            count_transition(snapshot.state);
        }
        let (version, payload) = wire::payload(next, fact);
        emit.emit(&next.id.to_string(), next.tenant.as_str(), version, payload);
    }
}

/// `gpualloc_saga_transitions_total{state}`. Counted in the transaction: a
/// rare retried transaction counts twice, which a rate does not notice.
fn count_transition(to: State) {
    crate::metrics::METRICS
        .saga_transitions
        .get_or_create(&gpualloc_telemetry::labels([("state", to.as_str())]))
        .inc();
}

fn refused(a: &Allocation, refusal: Refusal) -> Error {
    match refusal {
        Refusal::WrongState { state, action } => Error::WrongState {
            id: a.id.to_string(),
            state,
            action,
        },
        Refusal::NoLease => Error::NoLease(a.id.to_string()),
    }
}

/// Loads an allocation the caller may see; others' are NOT_FOUND, as if
/// they did not exist.
pub fn load_for(
    conn: &mut DbConnection,
    id: &AllocationId,
    caller: &Caller,
) -> Result<Allocation, Error> {
    match store::get(conn, id)? {
        Some(a) if a.visible_to(caller) => Ok(a),
        _ => Err(Error::NotFound(id.to_string())),
    }
}

pub fn cancel(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    id: &AllocationId,
    caller: &Caller,
    reason: &str,
) -> Result<Allocation, Error> {
    let a = load_for(conn, id, caller)?;
    let step = a
        .cancel(&caller.subject, reason, emit.now())
        .map_err(|r| refused(&a, r))?;
    commit(conn, emit, a, step)
}

/// Asks the pool to end the lease of an ALLOCATED allocation `lease` from
/// now ([`Allocation::renew`]).
pub fn renew(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    id: &AllocationId,
    caller: &Caller,
    lease: i64,
) -> Result<Allocation, Error> {
    let a = load_for(conn, id, caller)?;
    let step = a
        .renew(&caller.subject, lease, emit.now())
        .map_err(|r| refused(&a, r))?;
    commit(conn, emit, a, step)
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
) -> Result<Allocation, Error> {
    let a = load_for(conn, id, caller)?;
    let now = emit.now();
    let step = a
        .approve(&caller.subject, now)
        .map_err(|r| refused(&a, r))?;
    if matches!(step, Step::Next { .. }) {
        store::record_decision(conn, &a.id, "APPROVED", "", &decided_by(caller), now)?;
    }
    commit(conn, emit, a, step)
}

pub fn reject(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    id: &AllocationId,
    caller: &Caller,
    reason: &str,
) -> Result<Allocation, Error> {
    let a = load_for(conn, id, caller)?;
    let now = emit.now();
    let rejected_before =
        a.state == State::Rejected && store::decision(conn, &a.id)?.as_deref() == Some("REJECTED");
    let step = a
        .reject(&caller.subject, reason, rejected_before, now)
        .map_err(|r| refused(&a, r))?;
    if let Step::Next { next, .. } = &step {
        store::record_decision(
            conn,
            &a.id,
            "REJECTED",
            &next.reason,
            &decided_by(caller),
            now,
        )?;
    }
    commit(conn, emit, a, step)
}

/// Applies one decision of the resource pool about allocation `id` (of
/// `tenant`, as the event says), `version` in its reservation's order. A
/// decision that jumps past the next version is parked until the versions
/// between arrive; the rest is [`Allocation::apply`].
pub fn on_pool_decision(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    id: &AllocationId,
    tenant: &str,
    version: i64,
    decision: &PoolDecision,
    delivery: Delivery,
) -> Result<Outcome, Error> {
    let Some(a) = store::get(conn, id)? else {
        return Ok(Outcome::poison(
            "unknown_aggregate",
            format!("no allocation {id}"),
        ));
    };
    if tenant != a.tenant.as_str() {
        return Ok(Outcome::poison(
            "mismatch",
            format!(
                "the event names tenant {:?}, allocation {id} belongs to {}",
                gpualloc_platform::truncate(tenant, 64),
                a.tenant
            ),
        ));
    }
    if decision.is_ordered()
        && version > a.pool_version
        && let Some(wait) = version_gate(version, a.pool_version, delivery)
    {
        return Ok(wait);
    }
    let step = a.apply(decision, version, emit.now());
    commit(conn, emit, a, step)?;
    Ok(Outcome::Applied)
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
    let ids: Vec<String> = stuck.iter().map(|a| a.id.to_string()).collect();
    let unsent = gpualloc_storage::outbox::unpublished_among(conn, &ids)?;
    let mut n = 0;
    for (a, id) in stuck.iter().zip(&ids) {
        let Some(fact) = a.redrive() else { continue };
        if unsent.contains(id)
            || !store::claim_redrive(conn, a, policy.next_after(now, a.redrives))?
        {
            continue;
        }
        tracing::warn!(
            allocation_id = %a.id,
            state = %a.state,
            redrives = a.redrives + 1,
            "saga stuck waiting on the pool; re-driving"
        );
        announce(emit, a, &[fact]);
        n += 1;
    }
    Ok(n)
}
