//! The server span of every RPC (OpenTelemetry RPC conventions): a child
//! of the caller's context from W3C `traceparent` or Envoy's B3 headers,
//! carrying `x-request-id` (assigned here when the caller sent none, so
//! that logs and events of one request always share one). Handlers run
//! inside it, so what they log and the context they pass on belong to it.

use std::task::{Context, Poll};

use gpualloc_telemetry::trace as propagation;
use http::HeaderValue;
use tracing::{Instrument, field::Empty};

use super::{BoxError, BoxFuture, Req, Res, metrics::code_of};

#[derive(Clone, Copy, Debug, Default)]
pub struct Layer;

impl<S> tower::Layer<S> for Layer {
    type Service = Trace<S>;
    fn layer(&self, inner: S) -> Trace<S> {
        Trace { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Trace<S> {
    inner: S,
}

impl<S> tower::Service<Req> for Trace<S>
where
    S: tower::Service<Req, Response = Res> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError>,
{
    type Response = Res;
    type Error = BoxError;
    type Future = BoxFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, mut req: Req) -> Self::Future {
        let path = req.uri().path().trim_start_matches('/').to_owned();
        let (service, method) = path.split_once('/').unwrap_or((path.as_str(), ""));
        if !req.headers().contains_key(propagation::REQUEST_ID)
            && let Ok(v) = HeaderValue::from_str(&propagation::new_request_id())
        {
            req.headers_mut().insert(propagation::REQUEST_ID, v);
        }
        let request_id = req
            .headers()
            .get(propagation::REQUEST_ID)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let span = tracing::info_span!(
            "grpc",
            otel.name = %path,
            otel.kind = "server",
            otel.status_code = Empty,
            rpc.system = "grpc",
            rpc.service = %service,
            rpc.method = %method,
            rpc.grpc.status_code = Empty,
            request_id = %request_id,
            trace_id = Empty,
            span_id = Empty,
        );
        propagation::adopt(&span, propagation::extract_http(req.headers()));
        let fut = self.inner.call(req);
        let recorder = span.clone();
        Box::pin(
            async move {
                let result = fut.await.map_err(Into::into);
                if let Ok(r) = &result {
                    let code = code_of(r);
                    recorder.record("rpc.grpc.status_code", code as i32);
                    if code != tonic::Code::Ok {
                        recorder.record("otel.status_code", "ERROR");
                    }
                }
                result
            }
            .instrument(span),
        )
    }
}
