//! Telemetry shared by the saga plumbing, the platform and the services:
//! the process's Prometheus metrics ([`metrics`]) and trace context
//! propagation across gRPC calls and NATS hops ([`trace`]), so every part
//! names its metrics and carries context the same way.

pub mod metrics;
pub mod trace;

pub use metrics::{Labels, METRICS, labels, latency_histogram, register_service, replace_gauges};
pub use prometheus_client;
