//! The allocation service's own metrics: the saga's transitions, the
//! CheckQuota circuit breaker and the quota checks. Registered with the
//! process's `/metrics` when the service starts ([`register`]); the shared
//! RPC, bus and outbox metrics are the telemetry crate's.

use std::sync::LazyLock;

use gpualloc_telemetry::{
    Labels, latency_histogram,
    prometheus_client::{
        metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
        registry::Registry,
    },
};

pub struct AllocationMetrics {
    /// Allocation state transitions, by the state entered.
    pub saga_transitions: Family<Labels, Counter>,
    /// Circuit breaker state per target: 0 closed, 1 open, 2 half-open.
    pub breaker_state: Family<Labels, Gauge>,
    pub breaker_transitions: Family<Labels, Counter>,
    /// CheckQuota calls by outcome (verdict, timeout, error, or
    /// breaker_open: held back by the open breaker) and their duration.
    pub check_quota: Family<Labels, Counter>,
    pub check_quota_duration: Family<Labels, Histogram, fn() -> Histogram>,
}

pub static METRICS: LazyLock<AllocationMetrics> = LazyLock::new(|| {
    let m = AllocationMetrics {
        saga_transitions: Family::default(),
        breaker_state: Family::default(),
        breaker_transitions: Family::default(),
        check_quota: Family::default(),
        check_quota_duration: Family::new_with_constructor(latency_histogram),
    };
    let mut r = Registry::with_prefix("gpualloc");
    r.register(
        "saga_transitions",
        "Allocation state transitions by the state entered",
        m.saga_transitions.clone(),
    );
    r.register(
        "breaker_state",
        "Circuit breaker state: 0 closed, 1 open, 2 half-open",
        m.breaker_state.clone(),
    );
    r.register(
        "breaker_transitions",
        "Circuit breaker transitions by the state entered",
        m.breaker_transitions.clone(),
    );
    r.register(
        "check_quota",
        "CheckQuota calls by outcome",
        m.check_quota.clone(),
    );
    r.register(
        "check_quota_duration_seconds",
        "CheckQuota time by outcome (breaker_open: held back by the open breaker)",
        m.check_quota_duration.clone(),
    );
    gpualloc_telemetry::register_service(r);
    m
});

/// Makes `/metrics` show these from the start, before the first use.
pub fn register() {
    LazyLock::force(&METRICS);
}
