//! The resource pool's own metrics: capacity, usage and what is free per
//! pool and class; quota and usage per tenant and class; the hold queue.
//! Registered with the process's `/metrics` when the service starts
//! ([`register`]) and kept current by the capacity sampler in `lib.rs`.

use std::sync::LazyLock;

use gpualloc_telemetry::{
    Labels,
    prometheus_client::{
        metrics::{family::Family, gauge::Gauge},
        registry::Registry,
    },
};

pub struct CapacityMetrics {
    /// Requests in the hold queue.
    pub hold_queue_depth: Gauge,
    /// Per pool and class (`gpus.A100`, `cpu_millis`, `custom.SEAT`, …).
    pub pool_capacity: Family<Labels, Gauge>,
    pub pool_usage: Family<Labels, Gauge>,
    pub pool_free: Family<Labels, Gauge>,
    /// Per tenant and class: the quota's limit, what is granted, and what
    /// is charged (granted plus held).
    pub tenant_quota: Family<Labels, Gauge>,
    pub tenant_usage: Family<Labels, Gauge>,
    pub tenant_charged: Family<Labels, Gauge>,
}

pub static METRICS: LazyLock<CapacityMetrics> = LazyLock::new(|| {
    let m = CapacityMetrics {
        hold_queue_depth: Gauge::default(),
        pool_capacity: Family::default(),
        pool_usage: Family::default(),
        pool_free: Family::default(),
        tenant_quota: Family::default(),
        tenant_usage: Family::default(),
        tenant_charged: Family::default(),
    };
    let mut r = Registry::with_prefix("gpualloc");
    r.register(
        "hold_queue_depth",
        "Requests waiting in the hold queue",
        m.hold_queue_depth.clone(),
    );
    r.register(
        "pool_capacity",
        "A pool's capacity by class",
        m.pool_capacity.clone(),
    );
    r.register(
        "pool_usage",
        "What is granted on a pool, by class",
        m.pool_usage.clone(),
    );
    r.register(
        "pool_free",
        "Capacity minus usage on a pool, by class",
        m.pool_free.clone(),
    );
    r.register(
        "tenant_quota",
        "A tenant's quota limit by class",
        m.tenant_quota.clone(),
    );
    r.register(
        "tenant_usage",
        "What is granted to a tenant, by class",
        m.tenant_usage.clone(),
    );
    r.register(
        "tenant_charged",
        "What counts against a tenant's quota (granted plus held), by class",
        m.tenant_charged.clone(),
    );
    gpualloc_telemetry::register_service(r);
    m
});

/// Makes `/metrics` show these from the start, before the first sample.
pub fn register() {
    LazyLock::force(&METRICS);
}
