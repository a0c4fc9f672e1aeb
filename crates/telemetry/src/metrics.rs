//! The metrics every gpualloc service exports (RPCs, the bus, the outbox,
//! consumers) in one process-wide registry, the registries services add
//! for metrics of their own, and the `/metrics` endpoint serving them in
//! the Prometheus text format.
//!
//! One registry per process: in production a process is one service. Labels
//! carry what differs within a process (method, consumer, channel).

use std::{
    fmt::Write as _,
    net::SocketAddr,
    sync::{LazyLock, Mutex, atomic::AtomicU64},
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

/// The histogram every latency is measured in: 100 µs to ~13 s.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.0001, 2.0, 18))
}

/// Every metric, registered once.
pub struct Metrics {
    registry: Registry,
    /// gRPC requests served, by method and status code.
    pub rpc_requests: Family<Labels, Counter>,
    /// gRPC handling time, by method.
    pub rpc_duration: Family<Labels, Histogram, fn() -> Histogram>,
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
}

impl Metrics {
    fn new() -> Metrics {
        let mut registry = Registry::with_prefix("gpualloc");
        let m = Metrics {
            rpc_requests: Family::default(),
            rpc_duration: Family::new_with_constructor(latency_histogram),
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
        Metrics { registry, ..m }
    }

    /// The Prometheus text exposition of everything: the shared metrics
    /// and those the service registered ([`register_service`]).
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            let _ = writeln!(out, "# encoding failed");
        }
        let services = SERVICE_REGISTRIES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for registry in services.iter() {
            // One exposition: the previous registry's end marker goes.
            if let Some(body) = out.strip_suffix("# EOF\n") {
                out.truncate(body.len());
            }
            if encode(&mut out, registry).is_err() {
                let _ = writeln!(out, "# encoding failed");
            }
        }
        out
    }
}

/// Metrics a service keeps of its own (the allocation service's breaker
/// and quota checks, the pool's capacity, the viewer's notifications).
static SERVICE_REGISTRIES: Mutex<Vec<Registry>> = Mutex::new(Vec::new());

/// Adds a service's own metrics to what `/metrics` serves. Only the
/// process that registers them exports them, so no other service reports
/// a meaningless 0. The registry should use the `gpualloc` prefix.
pub fn register_service(registry: Registry) {
    SERVICE_REGISTRIES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .push(registry);
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
        // A service's own metric, in one exposition with the shared ones.
        let mut own = Registry::with_prefix("gpualloc");
        let depth = Gauge::<i64>::default();
        own.register("hold_queue_depth", "test", depth.clone());
        register_service(own);
        depth.set(3);
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
        assert_eq!(text.matches("# EOF").count(), 1, "{text}");
    }
}
