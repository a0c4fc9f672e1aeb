//! Subjects, relative to the configured prefix (`gpualloc` by default). The
//! hierarchy lets each consumer subscribe with one wildcard:
//! resource-pool reads `saga.allocation.>`, allocation reads
//! `saga.reservation.>`, the viewer reads everything.

pub const ALLOCATION_REQUESTED: &str = "saga.allocation.requested";
pub const ALLOCATION_CANCELLED: &str = "saga.allocation.cancelled";
pub const ALLOCATION_RENEWAL_REQUESTED: &str = "saga.allocation.renewal_requested";
pub const RESERVATION_GRANTED: &str = "saga.reservation.granted";
pub const RESERVATION_HELD: &str = "saga.reservation.held";
pub const RESERVATION_REJECTED: &str = "saga.reservation.rejected";
pub const RESERVATION_RELEASED: &str = "saga.reservation.released";
pub const RESERVATION_NEEDS_APPROVAL: &str = "saga.reservation.needs_approval";
pub const RESERVATION_RENEWED: &str = "saga.reservation.renewed";
pub const ALLOCATION_CHANGED: &str = "view.allocation.changed";
pub const QUOTA_CHANGED: &str = "view.quota.changed";
pub const POOL_CHANGED: &str = "view.pool.changed";

/// What resource-pool consumes.
pub const FILTER_ALLOCATION_SAGA: &str = "saga.allocation.>";
/// What allocation consumes.
pub const FILTER_RESERVATION_SAGA: &str = "saga.reservation.>";
/// What the viewer consumes: every event.
pub const FILTER_ALL: &str = ">";
