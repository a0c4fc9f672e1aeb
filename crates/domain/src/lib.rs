//! Domain types shared by the three gpualloc services: identifiers,
//! resource bundles and their accounting classes, pool capacity, allocation
//! states with their transition rules, time conversions, and the one
//! backoff every retry uses, and the caller a request acts for.
//!
//! The gRPC layer of each service turns prost messages into these types once
//! (`Resources::try_from`, `TenantId::parse`, ...) and collects every problem
//! as a field violation; the domain logic and storage never see prost types
//! and never re-validate.

mod backoff;
mod caller;
mod ids;
mod resources;
mod state;
pub mod time;
mod violation;

pub use backoff::Backoff;
pub use caller::Caller;
pub use ids::{AllocationId, CustomClass, GpuModel, PoolId, TenantId};
pub use resources::{Capacity, Class, MAX_AMOUNT, MAX_CUSTOM_CLASSES, ResourceField, Resources};
pub use state::State;
pub use violation::{ECHO_MAX, Violation, Violations, shown};
