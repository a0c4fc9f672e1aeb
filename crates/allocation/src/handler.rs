//! The consumer of the resource pool's decisions: each event is checked
//! and turned into a [`PoolDecision`] here, once, and applied by `ops`.
//! An event that cannot be one (a bad id, a grant without a valid pool)
//! is poison: parked, never applied.

use gpualloc_domain::{AllocationId, GpuModel, PoolId, time};
use gpualloc_proto::events::v1 as ev;
use gpualloc_saga::{Delivery, Emitter, Event, Handler, Outcome, Payload};
use gpualloc_storage::DbConnection;

use crate::{
    Error,
    machine::{PoolDecision, Release},
    ops,
};

/// Applies the resource pool's decisions to the allocation state machine.
#[derive(Debug, Default)]
pub struct PoolDecisions;

impl Handler for PoolDecisions {
    type Error = Error;

    fn handle(
        &self,
        conn: &mut DbConnection,
        emit: &mut Emitter,
        event: &Event,
        delivery: Delivery,
    ) -> Result<Outcome, Error> {
        let id = match AllocationId::parse(&event.allocation_id) {
            Ok(id) => id,
            Err(_) => {
                return Ok(Outcome::poison(
                    "invalid",
                    format!(
                        "allocation id {:?}",
                        gpualloc_platform::truncate(&event.allocation_id, 64)
                    ),
                ));
            }
        };
        let decision = match decision_of(event.payload.as_ref()) {
            Ok(d) => d,
            Err(poison) => return Ok(poison),
        };
        ops::on_pool_decision(
            conn,
            emit,
            &id,
            &event.tenant,
            event.aggregate_version,
            &decision,
            delivery,
        )
    }
}

/// What a pool event decides, or why it cannot be applied.
pub fn decision_of(payload: Option<&Payload>) -> Result<PoolDecision, Outcome> {
    let invalid = |what: &str| Outcome::poison("invalid", what.to_owned());
    Ok(match payload {
        Some(Payload::ReservationNeedsApproval(p)) => PoolDecision::NeedsApproval {
            reason: p.reason.clone(),
        },
        Some(Payload::ReservationGranted(g)) => PoolDecision::Granted {
            pool: PoolId::parse(g.pool_id.clone())
                .map_err(|_| invalid("a grant without a valid pool id"))?,
            gpu_model: match g.gpu_model.as_str() {
                "" => None,
                m => Some(
                    GpuModel::parse(m).map_err(|_| invalid("a grant of an invalid GPU model"))?,
                ),
            },
            expire_time: g.expire_time.as_ref().map(time::from_timestamp),
        },
        Some(Payload::ReservationHeld(h)) => PoolDecision::Held {
            reason: h.reason.clone(),
        },
        Some(Payload::ReservationRejected(r)) => PoolDecision::Rejected {
            reason: r.reason.clone(),
        },
        Some(Payload::ReservationReleased(r)) => PoolDecision::Released {
            cause: if r.cause == ev::ReleaseCause::Expired as i32 {
                Release::Expired
            } else {
                Release::Ended
            },
            // The pool names the pool it released from when there was
            // one; a name that is not a pool id is not one.
            pool: PoolId::parse(r.pool_id.clone()).ok(),
            reason: r.reason.clone(),
        },
        Some(Payload::ReservationRenewed(r)) => PoolDecision::Renewed {
            expire_time: r.expire_time.as_ref().map(time::from_timestamp),
        },
        _ => PoolDecision::Other,
    })
}
