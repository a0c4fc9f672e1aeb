//! Builds the read models from events. Every write is guarded by version:
//! a view only moves to a higher allocation version, the history keeps one
//! row per version, so duplicates and re-ordered events never move a view
//! backwards.

use diesel::prelude::*;
use gpualloc_domain::{AllocationId, TenantId};
use gpualloc_domain::{Resources, State, time};
use gpualloc_proto::events::v1 as ev;
use gpualloc_saga::{
    Delivery, Emitter, Event, Handler, MAX_PARKED, Outcome, Payload, version_gate,
};
use gpualloc_storage::{DbConnection, Native, update_cached};
use prost::Message;

use crate::{
    Error,
    notifications::Settings,
    schema::{allocation_history, allocation_views, tenant_quota_views},
};

/// The viewer's consumer: projects every event it understands, stores the
/// notifications they call for, and wakes this replica's watchers and
/// dispatcher after each commit.
#[derive(Debug, Default)]
pub struct Projection {
    pub changes: crate::watch::Changes,
    /// `None`: notifications are off.
    pub notify: Option<std::sync::Arc<Settings>>,
    pub wake: crate::notifications::delivery::Wake,
}

impl Handler for Projection {
    type Error = Error;

    fn handle(
        &self,
        conn: &mut DbConnection,
        emit: &mut Emitter,
        event: &Event,
        delivery: Delivery,
    ) -> Result<Outcome, Error> {
        if let Some(refusal) = validate(conn, event, delivery)? {
            return Ok(refusal);
        }
        project(conn, emit.now(), event, self.notify.as_deref())?;
        Ok(Outcome::Applied)
    }

    fn committed(&self, events: &[Event]) {
        if !events.is_empty() {
            self.changes.notify(
                events
                    .iter()
                    .map(|e| (!e.tenant.is_empty()).then_some(e.tenant.as_str())),
            );
            if self.notify.is_some() {
                self.wake.notify();
            }
        }
    }
}

fn state_name(v: i32) -> Result<&'static str, Error> {
    State::from_event(v)
        .map(State::as_str)
        .ok_or_else(|| Error::BadEvent(format!("unknown state {v}")))
}

/// Checks an event against itself and the read model before anything is
/// written: ids and tenants must be ids and agree with each other and with
/// the stored view (a view never changes tenant), states must be states,
/// and a version past the next one waits for those between ([`version_gate`]).
/// `None` when it may be projected.
pub fn validate(
    conn: &mut DbConnection,
    event: &Event,
    delivery: Delivery,
) -> Result<Option<Outcome>, Error> {
    let bad = |why: String| Ok(Some(Outcome::poison("invalid", why)));
    let mismatch = |why: String| Ok(Some(Outcome::poison("mismatch", why)));
    let stored = |conn: &mut DbConnection, id: &str| -> Result<Option<(String, i64)>, Error> {
        Ok(allocation_views::table
            .find(id)
            .select((allocation_views::tenant, allocation_views::version))
            .get_result_native(conn)
            .optional()?)
    };
    match &event.payload {
        Some(Payload::AllocationStateChanged(c)) => {
            let Some(a) = &c.allocation else {
                return bad("a state change without the allocation".into());
            };
            if AllocationId::parse(&a.allocation_id).is_err()
                || TenantId::parse(a.tenant.clone()).is_err()
            {
                return bad("the allocation's id or tenant is not valid".into());
            }
            if a.allocation_id != event.allocation_id
                || a.tenant != event.tenant
                || a.version != event.aggregate_version
            {
                return mismatch(format!(
                    "the event is about {} of {} at version {}, its allocation is {} of {} at version {}",
                    gpualloc_platform::truncate(&event.allocation_id, 64),
                    gpualloc_platform::truncate(&event.tenant, 64),
                    event.aggregate_version,
                    a.allocation_id,
                    a.tenant,
                    a.version
                ));
            }
            if State::from_event(a.state).is_none()
                || (c.previous_state != 0 && State::from_event(c.previous_state).is_none())
                || a.version < 1
            {
                return bad(format!(
                    "state {} or version {} is not valid",
                    a.state, a.version
                ));
            }
            let view = stored(conn, &a.allocation_id)?;
            if let Some((tenant, _)) = &view
                && *tenant != a.tenant
            {
                return mismatch(format!(
                    "allocation {} belongs to {tenant}, the event says {}",
                    a.allocation_id, a.tenant
                ));
            }
            let last = view.map_or(0, |(_, v)| v);
            Ok(version_gate(a.version, last, delivery))
        }
        Some(Payload::ReservationHeld(_)) => {
            if let Some((tenant, _)) = stored(conn, &event.allocation_id)?
                && tenant != event.tenant
            {
                return mismatch(format!(
                    "allocation {} belongs to {tenant}, the event says {}",
                    event.allocation_id,
                    gpualloc_platform::truncate(&event.tenant, 64)
                ));
            }
            Ok(None)
        }
        Some(Payload::TenantQuotaChanged(q)) => {
            if TenantId::parse(event.tenant.clone()).is_err() {
                return bad("not a tenant id".into());
            }
            if let Err(e) = Resources::try_from(q.limits.clone().unwrap_or_default()) {
                return bad(format!("quota limits: {e}"));
            }
            Ok(None)
        }
        _ => Ok(None),
    }
}

/// [`validate`] as a rebuild applies it: in stream order, with nothing
/// left to wait for.
pub fn valid_for_rebuild(conn: &mut DbConnection, event: &Event) -> Result<bool, Error> {
    Ok(validate(
        conn,
        event,
        Delivery {
            delivered: MAX_PARKED,
        },
    )?
    .is_none())
}

/// Applies one event to the read models and, with `notify`, stores the
/// notifications it calls for (a rebuild passes `None`: what was sent once
/// is not sent again).
pub fn project(
    conn: &mut DbConnection,
    now: i64,
    event: &Event,
    notify: Option<&Settings>,
) -> Result<(), Error> {
    match &event.payload {
        Some(Payload::AllocationStateChanged(c)) => apply_change(conn, now, event, c, notify),
        Some(Payload::ReservationHeld(h)) => {
            let view: Option<(String, i64)> = allocation_views::table
                .find(&event.allocation_id)
                .select((allocation_views::state, allocation_views::version))
                .get_result_native(conn)
                .optional()?;
            update_cached(
                allocation_views::table.find(&event.allocation_id),
                allocation_views::hold_position.eq(h.position),
            )
            .execute_native(conn)?;
            // Announce the hold unless the allocation has already moved on
            // (the hold arrived late, or after a cancel).
            let waiting = view
                .as_ref()
                .is_none_or(|(s, _)| s == State::Pending.as_str() || s == State::Held.as_str());
            if let (Some(settings), true) = (notify, waiting) {
                let when = event
                    .event_time
                    .as_ref()
                    .map(time::from_timestamp)
                    .unwrap_or(now);
                let n = crate::notifications::of_hold(
                    &event.event_id,
                    &event.tenant,
                    &event.allocation_id,
                    view.map(|(_, v)| v).unwrap_or(0),
                    h.position,
                    &h.reason,
                    when,
                );
                crate::notifications::enqueue(conn, settings, &n, now)?;
            }
            Ok(())
        }
        Some(Payload::TenantQuotaChanged(q)) => {
            let limits = Resources::try_from(q.limits.clone().unwrap_or_default())
                .map_err(|e| Error::BadEvent(format!("quota limits: {e}")))?;
            let limits =
                serde_json::to_string(&limits).map_err(|e| Error::BadEvent(e.to_string()))?;
            let current: Option<i64> = tenant_quota_views::table
                .find(&event.tenant)
                .select(tenant_quota_views::version)
                .get_result_native(conn)
                .optional()?;
            match current {
                None => {
                    diesel::insert_into(tenant_quota_views::table)
                        .values((
                            tenant_quota_views::tenant.eq(&event.tenant),
                            tenant_quota_views::limits.eq(&limits),
                            tenant_quota_views::version.eq(event.aggregate_version),
                        ))
                        .execute_native(conn)?;
                }
                Some(v) if v < event.aggregate_version => {
                    update_cached(
                        tenant_quota_views::table
                            .find(&event.tenant)
                            .filter(tenant_quota_views::version.lt(event.aggregate_version)),
                        (
                            tenant_quota_views::limits.eq(&limits),
                            tenant_quota_views::version.eq(event.aggregate_version),
                        ),
                    )
                    .execute_native(conn)?;
                }
                Some(_) => {}
            }
            Ok(())
        }
        _ => Ok(()),
    }
}

fn apply_change(
    conn: &mut DbConnection,
    now: i64,
    event: &Event,
    c: &ev::AllocationStateChanged,
    notify: Option<&Settings>,
) -> Result<(), Error> {
    let a = c
        .allocation
        .as_ref()
        .ok_or_else(|| Error::BadEvent(format!("{} carries no allocation", event.event_id)))?;
    let state = state_name(a.state)?;
    let previous = if c.previous_state == 0 {
        ""
    } else {
        state_name(c.previous_state)?
    };
    let change_time = a
        .update_time
        .as_ref()
        .map(time::from_timestamp)
        .unwrap_or(now);
    let snapshot = a.encode_to_vec();
    let seen: i64 = allocation_history::table
        .filter(allocation_history::allocation_id.eq(&a.allocation_id))
        .filter(allocation_history::version.eq(a.version))
        .count()
        .get_result_native(conn)?;
    if seen == 0 {
        diesel::insert_into(allocation_history::table)
            .values((
                allocation_history::allocation_id.eq(&a.allocation_id),
                allocation_history::version.eq(a.version),
                allocation_history::event_id.eq(&event.event_id),
                allocation_history::tenant.eq(&a.tenant),
                allocation_history::previous_state.eq(previous),
                allocation_history::state.eq(state),
                allocation_history::reason.eq(&a.reason),
                allocation_history::change_time.eq(change_time),
                allocation_history::snapshot.eq(&snapshot),
                allocation_history::project_time.eq(now),
                allocation_history::actor.eq(&c.actor),
            ))
            .execute_native(conn)?;
    }
    let current: Option<(i64, Option<i64>)> = allocation_views::table
        .find(&a.allocation_id)
        .select((allocation_views::version, allocation_views::expire_time))
        .get_result_native(conn)
        .optional()?;
    let expire_time = a.expire_time.as_ref().map(time::from_timestamp);
    // A change within ALLOCATED is a lease renewal: announced as one when
    // it moved the end, not as a second "allocated".
    let kind = match State::from_event(a.state) {
        Some(State::Allocated) if previous == state => {
            let before = current.and_then(|(_, e)| e);
            (expire_time > before && before.is_some())
                .then_some(crate::notifications::Kind::LeaseRenewed)
        }
        Some(s) => crate::notifications::Kind::of_state(s),
        None => None,
    };
    let current = current.map(|(v, _)| v);
    let create_time = a
        .create_time
        .as_ref()
        .map(time::from_timestamp)
        .unwrap_or(now);
    match current {
        None => {
            diesel::insert_into(allocation_views::table)
                .values((
                    allocation_views::allocation_id.eq(&a.allocation_id),
                    allocation_views::tenant.eq(&a.tenant),
                    allocation_views::state.eq(state),
                    allocation_views::version.eq(a.version),
                    allocation_views::create_time.eq(create_time),
                    allocation_views::update_time.eq(change_time),
                    allocation_views::hold_position.eq(0),
                    allocation_views::snapshot.eq(&snapshot),
                    allocation_views::project_time.eq(now),
                    allocation_views::expire_time.eq(expire_time),
                ))
                .execute_native(conn)?;
        }
        Some(v) if v < a.version => {
            // The guard is repeated in the UPDATE: on PostgreSQL another
            // replica may have moved the view between the read above and
            // this write, and its newer version must win.
            update_cached(
                allocation_views::table
                    .find(&a.allocation_id)
                    .filter(allocation_views::version.lt(a.version)),
                (
                    allocation_views::state.eq(state),
                    allocation_views::version.eq(a.version),
                    allocation_views::update_time.eq(change_time),
                    allocation_views::snapshot.eq(&snapshot),
                    allocation_views::project_time.eq(now),
                    allocation_views::expire_time.eq(expire_time),
                ),
            )
            .execute_native(conn)?;
        }
        // A stale version: in the history, but announced only if it were
        // news — telling a tenant "allocated" after "cancelled" misleads.
        Some(_) => return Ok(()),
    }
    if let (Some(settings), Some(kind)) = (notify, kind) {
        let n = crate::notifications::of_change(&event.event_id, kind, a, now);
        crate::notifications::enqueue(conn, settings, &n, now)?;
    }
    Ok(())
}
