//! Trace context and request id, carried from gRPC metadata into the
//! outbox rows (and from there into NATS headers) and into outbound calls,
//! so that one trace covers the whole saga. See
//! [`gpualloc_telemetry::trace`] for the formats.

use std::collections::BTreeMap;

use gpualloc_telemetry::trace;
use tonic::metadata::MetadataMap;

/// The headers to pass on from the current handler: its `x-request-id` and
/// the context of the current span (the RPC's server span), so that what
/// it causes becomes part of its trace.
pub fn headers(md: &MetadataMap) -> BTreeMap<String, String> {
    trace::outgoing(&tracing::Span::current(), &trace::inbound_http(md.as_ref()))
}

/// Copies `headers` into outgoing gRPC metadata.
pub fn inject(headers: &BTreeMap<String, String>, md: &mut MetadataMap) {
    for (k, v) in headers {
        if let (Ok(k), Ok(v)) = (
            k.parse::<tonic::metadata::MetadataKey<tonic::metadata::Ascii>>(),
            v.parse(),
        ) {
            md.insert(k, v);
        }
    }
}
