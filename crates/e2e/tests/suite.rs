//! The mesh end to end, in one test binary (a clean build links the whole
//! stack once for all of these instead of once per file). Each module is
//! what was a test file of its own; their tests share no process-wide
//! state. Tests that read the process-wide metrics registry keep binaries
//! of their own (breaker, bus, input_limits, metrics, outbox), so that
//! nothing else running beside them moves their counters.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

mod auth;
mod authz_matrix;
mod deploy;
mod fuzz;
mod ha;
mod jetstream_cluster;
mod mesh;
mod notify;
mod protection;
mod quota_cache;
mod replicas;
mod saga;
mod shutdown;
mod tls;
mod tracing;
mod viewer;
mod watch_limits;
