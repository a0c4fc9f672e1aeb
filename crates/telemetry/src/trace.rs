//! Trace context across gRPC calls and NATS hops.
//!
//! Inbound, the context comes from W3C `traceparent`/`tracestate` or from
//! Envoy's B3 headers (single `b3` or `x-b3-*`), whichever is present (W3C
//! wins when both are). Outbound — gRPC metadata, outbox rows, NATS
//! headers — both formats are written from the *current* span, so the next
//! hop's span is a child of this one and Envoy sidecars see B3 as well.
//! `x-request-id` travels unchanged.
//!
//! Without an OpenTelemetry layer (no OTLP endpoint configured) spans carry
//! no context; then the inbound headers are passed on as they came, so a
//! mesh that traces on its own (Istio) still sees one trace.

use std::collections::BTreeMap;

use opentelemetry::{
    Context,
    propagation::{
        Extractor, Injector, TextMapCompositePropagator, TextMapPropagator,
        text_map_propagator::FieldIter,
    },
    trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState},
};
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Request identity, as Envoy sets it.
pub const REQUEST_ID: &str = "x-request-id";

/// Headers that carry trace context and request identity from the gRPC call
/// that started a saga through every event it causes.
pub const TRACE_HEADERS: &[&str] = &[
    "traceparent",
    "tracestate",
    REQUEST_ID,
    "b3",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
];

/// B3 (Zipkin, Envoy) propagation: reads the single `b3` header or the
/// `x-b3-*` headers, writes the `x-b3-*` headers.
#[derive(Clone, Copy, Debug, Default)]
pub struct B3;

static B3_FIELDS: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
    ["x-b3-traceid", "x-b3-spanid", "x-b3-sampled", "b3"]
        .map(String::from)
        .to_vec()
});

fn trace_id(hex: &str) -> Option<TraceId> {
    // 64-bit trace ids are left-padded to 128 bits.
    let id = match hex.len() {
        16 => TraceId::from_hex(&format!("{:0>32}", hex)).ok()?,
        32 => TraceId::from_hex(hex).ok()?,
        _ => return None,
    };
    (id != TraceId::INVALID).then_some(id)
}

fn span_id(hex: &str) -> Option<SpanId> {
    let id = (hex.len() == 16).then(|| SpanId::from_hex(hex).ok())??;
    (id != SpanId::INVALID).then_some(id)
}

fn sampled(flag: Option<&str>, debug: Option<&str>) -> TraceFlags {
    // Absent means "defer to the receiver": sample, like Envoy's default.
    match (flag, debug) {
        (_, Some("1")) => TraceFlags::SAMPLED,
        (Some("0") | Some("false") | Some("d0"), _) => TraceFlags::NOT_SAMPLED,
        _ => TraceFlags::SAMPLED,
    }
}

impl TextMapPropagator for B3 {
    fn inject_context(&self, cx: &Context, injector: &mut dyn Injector) {
        let span = cx.span();
        let sc = span.span_context();
        if sc.is_valid() {
            injector.set("x-b3-traceid", sc.trace_id().to_string());
            injector.set("x-b3-spanid", sc.span_id().to_string());
            injector.set(
                "x-b3-sampled",
                if sc.is_sampled() { "1" } else { "0" }.to_owned(),
            );
        }
    }

    fn extract_with_context(&self, cx: &Context, extractor: &dyn Extractor) -> Context {
        let context = if let Some(single) = extractor.get("b3") {
            let parts: Vec<&str> = single.split('-').collect();
            match parts.as_slice() {
                [t, s, rest @ ..] => trace_id(t).zip(span_id(s)).map(|(t, s)| {
                    let flags = sampled(rest.first().copied(), None);
                    (t, s, flags)
                }),
                _ => None,
            }
        } else {
            let t = extractor.get("x-b3-traceid").and_then(trace_id);
            let s = extractor.get("x-b3-spanid").and_then(span_id);
            t.zip(s).map(|(t, s)| {
                let flags = sampled(extractor.get("x-b3-sampled"), extractor.get("x-b3-flags"));
                (t, s, flags)
            })
        };
        match context {
            Some((t, s, flags)) => cx.with_remote_span_context(SpanContext::new(
                t,
                s,
                flags,
                true,
                TraceState::default(),
            )),
            None => cx.clone(),
        }
    }

    fn fields(&self) -> FieldIter<'_> {
        FieldIter::new(B3_FIELDS.as_slice())
    }
}

/// W3C trace context and B3 together; W3C wins when both are present (the
/// later propagator overrides). Built once: it is used on every RPC and
/// every event.
pub fn propagator() -> &'static TextMapCompositePropagator {
    static PROPAGATOR: std::sync::LazyLock<TextMapCompositePropagator> =
        std::sync::LazyLock::new(|| {
            TextMapCompositePropagator::new(vec![
                Box::new(B3),
                Box::new(opentelemetry_sdk::propagation::TraceContextPropagator::new()),
            ])
        });
    &PROPAGATOR
}

/// Reads propagation headers from a string map (outbox rows, NATS).
pub struct MapExtractor<'a>(pub &'a BTreeMap<String, String>);

impl Extractor for MapExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(String::as_str)
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(String::as_str).collect()
    }
}

/// Reads propagation headers from HTTP/gRPC headers.
pub struct HeaderExtractor<'a>(pub &'a http::HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(|k| k.as_str()).collect()
    }
}

struct MapInjector<'a>(&'a mut BTreeMap<String, String>);

impl Injector for MapInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key.to_owned(), value);
    }
}

/// The remote parent described by `headers` (empty context when none).
pub fn extract(headers: &BTreeMap<String, String>) -> Context {
    propagator().extract_with_context(&Context::new(), &MapExtractor(headers))
}

/// The same from HTTP headers.
pub fn extract_http(headers: &http::HeaderMap) -> Context {
    propagator().extract_with_context(&Context::new(), &HeaderExtractor(headers))
}

/// Makes `span` a child of the context in `headers` (if any) and records
/// its trace and span ids as fields (`trace_id`, `span_id`, declared
/// `Empty` on the span) so logs carry them.
pub fn adopt(span: &tracing::Span, parent: Context) {
    if parent.span().span_context().is_valid() {
        let _ = span.set_parent(parent);
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
        span.record("span_id", tracing::field::display(sc.span_id()));
    }
}

/// The headers to send on from within `span`: `x-request-id` from
/// `inbound`, and the trace context of `span` in both formats — or, when
/// `span` carries none (tracing is off), the inbound trace headers as they
/// came.
pub fn outgoing(
    span: &tracing::Span,
    inbound: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(id) = inbound.get(REQUEST_ID) {
        out.insert(REQUEST_ID.to_owned(), id.clone());
    }
    let cx = span.context();
    if cx.span().span_context().is_valid() {
        propagator().inject_context(&cx, &mut MapInjector(&mut out));
    } else {
        for name in TRACE_HEADERS {
            if let Some(v) = inbound.get(*name) {
                out.insert((*name).to_owned(), v.clone());
            }
        }
    }
    out
}

/// The propagation headers present in HTTP headers.
pub fn inbound_http(headers: &http::HeaderMap) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for name in TRACE_HEADERS {
        if let Some(v) = headers.get(*name).and_then(|v| v.to_str().ok()) {
            out.insert((*name).to_owned(), v.to_owned());
        }
    }
    out
}

/// A fresh request id for requests that arrive without one.
pub fn new_request_id() -> String {
    uuid::Uuid::new_v4().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    fn ids(cx: &Context) -> (String, String, bool) {
        let span = cx.span();
        let sc = span.span_context();
        (
            sc.trace_id().to_string(),
            sc.span_id().to_string(),
            sc.is_sampled(),
        )
    }

    #[test]
    fn reads_w3c_and_both_b3_forms() {
        let w3c = extract(&map(&[(
            "traceparent",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        )]));
        assert_eq!(
            ids(&w3c),
            (
                "4bf92f3577b34da6a3ce929d0e0e4736".into(),
                "00f067aa0ba902b7".into(),
                true
            )
        );
        let multi = extract(&map(&[
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
            ("x-b3-sampled", "1"),
        ]));
        assert_eq!(
            ids(&multi),
            (
                "80f198ee56343ba864fe8b2a57d3eff7".into(),
                "e457b5a2e4d86bd1".into(),
                true
            )
        );
        // A 64-bit trace id, single-header form, not sampled.
        let single = extract(&map(&[("b3", "a3ce929d0e0e4736-00f067aa0ba902b7-0")]));
        assert_eq!(
            ids(&single),
            (
                "0000000000000000a3ce929d0e0e4736".into(),
                "00f067aa0ba902b7".into(),
                false
            )
        );
        // W3C wins when both are present.
        let both = extract(&map(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
            ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ]));
        assert_eq!(ids(&both).0, "4bf92f3577b34da6a3ce929d0e0e4736");
    }

    #[test]
    fn ignores_malformed_context() {
        for bad in [
            map(&[(
                "traceparent",
                "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            )]),
            map(&[(
                "traceparent",
                "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )]),
            map(&[("traceparent", "garbage")]),
            map(&[("x-b3-traceid", "xyz"), ("x-b3-spanid", "e457b5a2e4d86bd1")]),
            map(&[("b3", "0")]),
        ] {
            assert!(!extract(&bad).span().span_context().is_valid(), "{bad:?}");
        }
    }

    #[test]
    fn without_tracing_the_inbound_headers_pass_through() {
        let inbound = map(&[
            (
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            ),
            ("x-request-id", "r-1"),
            ("authorization", "secret"),
        ]);
        let out = outgoing(&tracing::Span::none(), &inbound);
        assert_eq!(out.len(), 2);
        assert_eq!(out["x-request-id"], "r-1");
        assert!(!out.contains_key("authorization"));
    }
}
