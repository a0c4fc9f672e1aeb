//! The public API as users meet it, end to end (one test binary, so that
//! a clean build links the whole stack once for all of them): partial
//! updates and capacity at a glance, errors as grpcurl shows them, hold
//! positions and estimated starts, less to type, and who ended what when.

#![allow(clippy::unwrap_used)]

mod endings;
mod grpcurl;
mod hold_queue;
mod less_to_type;
mod partial_updates;
