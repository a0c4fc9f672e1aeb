//! The metrics every gpualloc service exports, in one process-wide
//! registry, and a small HTTP endpoint serving them in the Prometheus text
//! format.
//!
//! One registry per process: in production a process is one service. Labels
//! carry what differs within a process (method, consumer, channel).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{LazyLock, OnceLock, atomic::AtomicU64},
};

use prometheus_client::{
    encoding::text::encode,
    metrics::{
        counter::Counter,
        family::Family,
        gauge::Gauge,
        histogram::{Histogram, exponential_buckets},
    },
    registry::Registry,
};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// A metric's labels.
pub type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn latency() -> Histogram {
    // 100 µs to ~13 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Every metric, registered once.
pub struct Metrics {
    registry: Registry,
    /// gRPC requests served, by method and status code.
    pub rpc_requests: Family<Labels, Counter>,
    /// gRPC handling time, by method.
    pub rpc_duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// Allocation state transitions, by the state entered.
    pub saga_transitions: Family<Labels, Counter>,
    /// Whether the service's NATS connection is up (1) or not (0).
    pub nats_connected: Family<Labels, Gauge>,
    /// Unpublished outbox rows, and the age of the oldest, by service.
    pub outbox_backlog: Family<Labels, Gauge>,
    pub outbox_oldest_age: Family<Labels, FloatGauge>,
    /// Events published by the relay, by service.
    pub outbox_published: Family<Labels, Counter>,
    /// Messages a durable consumer has not been delivered yet, and
    /// delivered but not acknowledged, by consumer.
    pub consumer_pending: Family<Labels, Gauge>,
    pub consumer_ack_pending: Family<Labels, Gauge>,
    /// Events a consumer applied, and messages it got more than once.
    pub consumer_events: Family<Labels, Counter>,
    pub consumer_redeliveries: Family<Labels, Counter>,
    /// Events set aside as invalid (acknowledged, never applied), by
    /// consumer and reason; and events parked for a later delivery.
    pub events_poison: Family<Labels, Counter>,
    pub events_parked: Family<Labels, Counter>,
    /// Outbox rows set aside after failing to publish, by service.
    pub outbox_poison: Family<Labels, Gauge>,
    /// Circuit breaker state per target: 0 closed, 1 open, 2 half-open.
    pub breaker_state: Family<Labels, Gauge>,
    pub breaker_transitions: Family<Labels, Counter>,
    /// CheckQuota calls by outcome (verdict, timeout, error, or
    /// breaker_open: held back by the open breaker) and their duration.
    pub check_quota: Family<Labels, Counter>,
    pub check_quota_duration: Family<Labels, Histogram, fn() -> Histogram>,
    /// Notification delivery attempts by channel and outcome.
    pub notifications: Family<Labels, Counter>,
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("gpualloc");
        let m = Metrics {
            rpc_requests: Family::default(),
            rpc_duration: Family::new_with_constructor(latency),
            saga_transitions: Family::default(),
            nats_connected: Family::default(),
            outbox_backlog: Family::default(),
            outbox_oldest_age: Family::default(),
            outbox_published: Family::default(),
            consumer_pending: Family::default(),
            consumer_ack_pending: Family::default(),
            consumer_events: Family::default(),
            consumer_redeliveries: Family::default(),
            events_poison: Family::default(),
            events_parked: Family::default(),
            outbox_poison: Family::default(),
            breaker_state: Family::default(),
            breaker_transitions: Family::default(),
            check_quota: Family::default(),
            check_quota_duration: Family::new_with_constructor(latency),
            notifications: Family::default(),
            registry: Registry::default(),
        };
        let r = &mut registry;
        r.register(
            "rpc_requests",
            "gRPC requests served, by method and status code",
            m.rpc_requests.clone(),
        );
        r.register(
            "rpc_duration_seconds",
            "gRPC handling time by method",
            m.rpc_duration.clone(),
        );
        r.register(
            "saga_transitions",
            "Allocation state transitions by the state entered",
            m.saga_transitions.clone(),
        );
        r.register(
            "nats_connected",
            "Whether the NATS connection is up (1) or not (0); creates are still accepted while it is down",
            m.nats_connected.clone(),
        );
        r.register(
            "outbox_backlog",
            "Outbox rows not yet published",
            m.outbox_backlog.clone(),
        );
        r.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest unpublished outbox row",
            m.outbox_oldest_age.clone(),
        );
        r.register(
            "outbox_published",
            "Events published to JetStream by the relay",
            m.outbox_published.clone(),
        );
        r.register(
            "consumer_pending",
            "Messages not yet delivered to the durable consumer (lag)",
            m.consumer_pending.clone(),
        );
        r.register(
            "consumer_ack_pending",
            "Messages delivered but not acknowledged",
            m.consumer_ack_pending.clone(),
        );
        r.register(
            "consumer_events",
            "Events applied by the consumer",
            m.consumer_events.clone(),
        );
        r.register(
            "consumer_redeliveries",
            "Messages delivered to the consumer more than once",
            m.consumer_redeliveries.clone(),
        );
        r.register(
            "events_poison",
            "Events a consumer set aside as invalid (acknowledged, not applied), by reason",
            m.events_poison.clone(),
        );
        r.register(
            "events_parked",
            "Events a consumer put back for later (an earlier version is missing)",
            m.events_parked.clone(),
        );
        r.register(
            "outbox_poison",
            "Outbox rows set aside after failing to publish (see `outbox --poisoned`)",
            m.outbox_poison.clone(),
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
        r.register(
            "notifications",
            "Notification delivery attempts by channel and outcome",
            m.notifications.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition of everything, with the capacity
    /// metrics when this process keeps them.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            let _ = writeln!(out, "# encoding failed");
        }
        if let Some(capacity) = CAPACITY.get() {
            // One exposition: the first registry's end marker goes.
            if let Some(body) = out.strip_suffix("# EOF\n") {
                out.truncate(body.len());
            }
            if encode(&mut out, &capacity.registry).is_err() {
                let _ = writeln!(out, "# encoding failed");
            }
        }
        out
    }
}

/// What the resource pool knows: capacity, usage and what is free per
/// pool and class; quota and usage per tenant and class; the hold queue.
/// Only a process that calls [`capacity_metrics`] (the resource pool)
/// exports them, so no other service reports a meaningless 0.
pub struct CapacityMetrics {
    registry: Registry,
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

static CAPACITY: OnceLock<CapacityMetrics> = OnceLock::new();

/// The capacity metrics, registered on first use.
pub fn capacity_metrics() -> &'static CapacityMetrics {
    CAPACITY.get_or_init(|| {
        let mut registry = Registry::with_prefix("gpualloc");
        let m = CapacityMetrics {
            registry: Registry::default(),
            hold_queue_depth: Gauge::default(),
            pool_capacity: Family::default(),
            pool_usage: Family::default(),
            pool_free: Family::default(),
            tenant_quota: Family::default(),
            tenant_usage: Family::default(),
            tenant_charged: Family::default(),
        };
        let r = &mut registry;
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
        CapacityMetrics { registry, ..m }
    })
}

/// Sets `family` to exactly `values`: series that are gone since the last
/// call (`previous`: a deleted pool, a class no longer granted) are
/// removed, so no stale value lingers.
pub fn replace_gauges(
    family: &Family<Labels, Gauge>,
    previous: &mut Vec<Labels>,
    values: Vec<(Labels, i64)>,
) {
    for labels in previous.iter() {
        if !values.iter().any(|(l, _)| l == labels) {
            family.remove(labels);
        }
    }
    for (labels, v) in &values {
        family.get_or_create(labels).set(*v);
    }
    *previous = values.into_iter().map(|(l, _)| l).collect();
}

/// The process's metrics.
pub static METRICS: LazyLock<Metrics> = LazyLock::new(Metrics::new);

/// A label set.
pub fn labels<const N: usize>(pairs: [(&'static str, &str); N]) -> Labels {
    pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect()
}

/// Serves `GET /metrics` on `listener` until `stop` fires (axum, the HTTP
/// stack tonic already brings).
pub async fn serve(listener: TcpListener, stop: CancellationToken) {
    use axum::{http::StatusCode, routing::get};
    let addr: Option<SocketAddr> = listener.local_addr().ok();
    tracing::info!(?addr, "serving metrics on /metrics");
    let app = axum::Router::new()
        .route("/metrics", get(render))
        .fallback(|| async { (StatusCode::NOT_FOUND, "try /metrics\n") });
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(stop.cancelled_owned())
        .await
    {
        tracing::warn!(error = %e, "metrics endpoint failed");
    }
}

async fn render() -> impl axum::response::IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        METRICS.render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_registered_metrics_with_labels() {
        METRICS
            .rpc_requests
            .get_or_create(&labels([("method", "/x.Y/Z"), ("code", "OK")]))
            .inc();
        capacity_metrics().hold_queue_depth.set(3);
        METRICS
            .rpc_duration
            .get_or_create(&labels([("method", "/x.Y/Z")]))
            .observe(0.0002);
        let text = METRICS.render();
        assert!(
            text.contains(r#"gpualloc_rpc_requests_total{method="/x.Y/Z",code="OK"} 1"#),
            "{text}"
        );
        assert!(text.contains("gpualloc_hold_queue_depth 3"), "{text}");
        assert!(
            text.contains("# TYPE gpualloc_rpc_duration_seconds histogram"),
            "{text}"
        );
    }
}
