//! The allocation as messages: the API's `Allocation` a caller receives,
//! and the events' snapshot and payloads this service publishes — two
//! contracts that may drift apart. The only place
//! that builds them from an [`Allocation`].

use gpualloc_domain::{State, time};
use gpualloc_proto::{allocation::v1 as pb, events::v1 as ev, resourcepool::v1 as rp};
use gpualloc_saga::Payload;

use crate::machine::{Allocation, Fact};

/// Both contracts show an allocation with the same fields today; one
/// expansion per message keeps them filled alike while letting either
/// message change on its own (a field one of them gains or loses fails to
/// compile here, not silently).
macro_rules! allocation_message {
    ($(#[$doc:meta])* $name:ident -> $message:path, $resources:path, $state:ident) => {
        $(#[$doc])*
        pub fn $name(a: &Allocation) -> $message {
            // An allocation that never ran has no expiry to show.
            let early = matches!(a.state, State::Cancelled | State::Rejected);
            $message {
                allocation_id: a.id.to_string(),
                tenant: a.tenant.to_string(),
                resources: Some(<$resources>::from(&a.resources)),
                state: a.state.$state() as i32,
                reason: a.reason.clone(),
                pool: a.pool.as_ref().map(ToString::to_string).unwrap_or_default(),
                priority: a.priority,
                request_id: a.request_id.clone().unwrap_or_default(),
                labels: a.labels.clone(),
                version: a.version,
                create_time: Some(time::to_timestamp(a.create_time)),
                update_time: Some(time::to_timestamp(a.update_time)),
                expire_time: a.expire_time.filter(|_| !early).map(time::to_timestamp),
                lease: a.lease.map(time::to_duration),
                display_name: a.display_name.clone(),
                end_time: a.end_time().map(time::to_timestamp),
            }
        }
    };
}

allocation_message!(
    /// What a caller sees.
    to_proto -> pb::Allocation, rp::Resources, to_proto
);
allocation_message!(
    /// The allocation as events carry it: the events' own message, which
    /// changes only when the saga's contract does, whatever the API does.
    snapshot -> ev::AllocationSnapshot, ev::Resources, to_event
);

/// The payload announcing `fact`, a fact of the step that ended with
/// `next`, with the version it belongs to.
pub fn payload(next: &Allocation, fact: &Fact) -> (i64, Payload) {
    match fact {
        Fact::Changed {
            snapshot,
            previous,
            actor,
        } => (
            snapshot.version,
            Payload::AllocationStateChanged(ev::AllocationStateChanged {
                previous_state: previous.map(|s| s.to_event() as i32).unwrap_or(0),
                allocation: Some(self::snapshot(snapshot)),
                actor: actor.clone(),
            }),
        ),
        Fact::PlacementRequested => (
            next.version,
            Payload::AllocationRequested(ev::AllocationRequested {
                resources: Some(ev::Resources::from(&next.resources)),
                priority: next.priority,
                lease: next.lease.map(time::to_duration),
                create_time: Some(time::to_timestamp(next.create_time)),
                approved: next.approved_time.is_some(),
            }),
        ),
        Fact::ReleaseRequested => (
            next.version,
            Payload::AllocationCancelled(ev::AllocationCancelled {
                reason: next.reason.clone(),
            }),
        ),
        Fact::RenewalRequested { end } => (
            next.version,
            Payload::AllocationRenewalRequested(ev::AllocationRenewalRequested {
                expire_time: Some(time::to_timestamp(*end)),
            }),
        ),
    }
}
