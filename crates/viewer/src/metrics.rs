//! The viewer's own metrics: notification deliveries. Registered with the
//! process's `/metrics` when the service starts ([`register`]).

use std::sync::LazyLock;

use gpualloc_telemetry::{
    Labels,
    prometheus_client::{
        metrics::{counter::Counter, family::Family},
        registry::Registry,
    },
};

pub struct ViewerMetrics {
    /// Notification delivery attempts by channel and outcome.
    pub notifications: Family<Labels, Counter>,
}

pub static METRICS: LazyLock<ViewerMetrics> = LazyLock::new(|| {
    let m = ViewerMetrics {
        notifications: Family::default(),
    };
    let mut r = Registry::with_prefix("gpualloc");
    r.register(
        "notifications",
        "Notification delivery attempts by channel and outcome",
        m.notifications.clone(),
    );
    gpualloc_telemetry::register_service(r);
    m
});

/// Makes `/metrics` show these from the start, before the first use.
pub fn register() {
    LazyLock::force(&METRICS);
}
