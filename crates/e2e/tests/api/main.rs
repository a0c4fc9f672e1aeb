//! The public API as users meet it, end to end (one test binary, so that
//! a clean build links the whole stack once for all of them): partial
//! updates and capacity at a glance, errors as grpcurl shows them, hold
//! positions and estimated starts, less to type, who ended what when, and
//! lease renewals; and the cookbook and README walk-through, run as
//! written.

#![allow(clippy::unwrap_used)]

mod docs;
mod endings;
mod grpcurl;
mod hold_queue;
mod less_to_type;
mod partial_updates;
mod renewal;
mod resume;
