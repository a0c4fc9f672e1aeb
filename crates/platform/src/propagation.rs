//! Trace context and request id, carried from gRPC metadata into the
//! outbox rows (and from there into NATS headers) so that one trace covers
//! the whole saga.

use std::collections::BTreeMap;

use gpualloc_saga::TRACE_HEADERS;
use tonic::metadata::MetadataMap;

/// The propagation headers present in `md`.
pub fn headers(md: &MetadataMap) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for name in TRACE_HEADERS {
        if let Some(v) = md.get(*name).and_then(|v| v.to_str().ok()) {
            out.insert((*name).to_owned(), v.to_owned());
        }
    }
    out
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
