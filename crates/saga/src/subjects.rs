//! The saga's subjects (defined with the bus permissions in
//! `gpualloc-nats-acl`, which say who may publish each), and the subject of
//! each event payload.

pub use gpualloc_nats_acl::subjects::*;

use crate::Payload;

pub fn of(payload: &Payload) -> &'static str {
    match payload {
        Payload::AllocationRequested(_) => ALLOCATION_REQUESTED,
        Payload::AllocationCancelled(_) => ALLOCATION_CANCELLED,
        Payload::AllocationRenewalRequested(_) => ALLOCATION_RENEWAL_REQUESTED,
        Payload::AllocationStateChanged(_) => ALLOCATION_CHANGED,
        Payload::ReservationGranted(_) => RESERVATION_GRANTED,
        Payload::ReservationHeld(_) => RESERVATION_HELD,
        Payload::ReservationRejected(_) => RESERVATION_REJECTED,
        Payload::ReservationReleased(_) => RESERVATION_RELEASED,
        Payload::ReservationNeedsApproval(_) => RESERVATION_NEEDS_APPROVAL,
        Payload::ReservationRenewed(_) => RESERVATION_RENEWED,
        Payload::TenantQuotaChanged(_) => QUOTA_CHANGED,
        Payload::PoolChanged(_) => POOL_CHANGED,
    }
}
