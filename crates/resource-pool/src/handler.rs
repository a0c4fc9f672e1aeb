use gpualloc_domain::{AllocationId, TenantId};
use gpualloc_saga::{Delivery, Emitter, Event, Handler, Outcome, Payload};
use gpualloc_storage::DbConnection;

use crate::{Error, saga};

/// Applies the allocation service's saga events: requests, cancels and
/// lease renewals.
#[derive(Debug, Default)]
pub struct AllocationEvents;

impl Handler for AllocationEvents {
    type Error = Error;

    fn handle(
        &self,
        conn: &mut DbConnection,
        emit: &mut Emitter,
        event: &Event,
        _delivery: Delivery,
    ) -> Result<Outcome, Error> {
        if let Some(refusal) = validate(conn, event)? {
            return Ok(refusal);
        }
        match &event.payload {
            Some(Payload::AllocationRequested(req)) => saga::on_requested(conn, emit, event, req)?,
            Some(Payload::AllocationCancelled(req)) => saga::on_cancelled(conn, emit, event, req)?,
            Some(Payload::AllocationRenewalRequested(req)) => {
                saga::on_renewal_requested(conn, emit, event, req)?
            }
            _ => {
                return Ok(Outcome::poison(
                    "subject",
                    "not an allocation request, cancel or renewal",
                ));
            }
        }
        Ok(Outcome::Applied)
    }
}

/// Checks a request or cancel before anything is written: its ids must be
/// ids, its priority in range, and it must name the tenant that the
/// reservation (if there is one already) belongs to.
fn validate(conn: &mut DbConnection, event: &Event) -> Result<Option<Outcome>, Error> {
    if AllocationId::parse(&event.allocation_id).is_err() {
        return Ok(Some(Outcome::poison("invalid", "not an allocation id")));
    }
    if TenantId::parse(event.tenant.clone()).is_err() {
        return Ok(Some(Outcome::poison("invalid", "not a tenant id")));
    }
    if let Some(Payload::AllocationRequested(r)) = &event.payload
        && !(0..=1000).contains(&r.priority)
    {
        return Ok(Some(Outcome::poison(
            "invalid",
            format!("priority {} is outside 0..=1000", r.priority),
        )));
    }
    if let Some(Payload::AllocationRenewalRequested(r)) = &event.payload
        && r.expire_time.is_none()
    {
        return Ok(Some(Outcome::poison("invalid", "a renewal without an end")));
    }
    if let Some(r) = crate::store::get_reservation(conn, &event.allocation_id)?
        && r.tenant != event.tenant
    {
        return Ok(Some(Outcome::poison(
            "mismatch",
            format!(
                "the event names tenant {:?}, the reservation of {} belongs to {}",
                gpualloc_platform::truncate(&event.tenant, 64),
                event.allocation_id,
                r.tenant
            ),
        )));
    }
    Ok(None)
}
