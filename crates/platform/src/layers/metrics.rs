//! RPC rate, errors and latency per method: `gpualloc_rpc_requests_total`
//! by method and status code, `gpualloc_rpc_duration_seconds` by method
//! (time to the response head; for server streams, to the first message).
//! The method label is the gRPC path of a served method, or `unknown`:
//! paths come from clients, and a scan of random ones must not grow the
//! label set without bound.

use std::{
    collections::HashSet,
    sync::{Arc, OnceLock},
    task::{Context, Poll},
    time::Instant,
};

use gpualloc_telemetry::{METRICS, labels};
use tonic::Code;

use super::{BoxError, BoxFuture, Req, Res};

#[derive(Clone, Debug)]
pub struct Layer {
    known: Arc<HashSet<String>>,
}

impl Layer {
    pub fn new() -> Self {
        Self {
            known: known_methods(),
        }
    }
}

impl Default for Layer {
    fn default() -> Self {
        Self::new()
    }
}

/// Every gRPC path a gpualloc process can serve: the methods of the
/// contract's services, health and reflection.
pub fn known_methods() -> Arc<HashSet<String>> {
    static KNOWN: OnceLock<Arc<HashSet<String>>> = OnceLock::new();
    KNOWN
        .get_or_init(|| {
            use prost::Message as _;
            let mut known = HashSet::new();
            for set in [
                gpualloc_proto::FILE_DESCRIPTOR_SET,
                tonic_health::pb::FILE_DESCRIPTOR_SET,
            ] {
                if let Ok(fds) = prost_types::FileDescriptorSet::decode(set) {
                    for file in fds.file {
                        for svc in &file.service {
                            for m in &svc.method {
                                known.insert(format!(
                                    "/{}.{}/{}",
                                    file.package(),
                                    svc.name(),
                                    m.name()
                                ));
                            }
                        }
                    }
                }
            }
            for version in ["v1", "v1alpha"] {
                known.insert(format!(
                    "/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo"
                ));
            }
            Arc::new(known)
        })
        .clone()
}

impl<S> tower::Layer<S> for Layer {
    type Service = Metrics<S>;
    fn layer(&self, inner: S) -> Metrics<S> {
        Metrics {
            inner,
            known: self.known.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Metrics<S> {
    inner: S,
    known: Arc<HashSet<String>>,
}

/// The status of a response whose head carries one (errors are sent as
/// trailers-only responses); OK otherwise.
pub fn code_of(response: &Res) -> Code {
    response
        .headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .map_or(Code::Ok, Code::from_i32)
}

impl<S> tower::Service<Req> for Metrics<S>
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

    fn call(&mut self, req: Req) -> Self::Future {
        let path = req.uri().path();
        // Probes and grpcurl's reflection are not API traffic: counting
        // them would bury the requests people make.
        if path.starts_with("/grpc.health.") || path.starts_with("/grpc.reflection.") {
            let fut = self.inner.call(req);
            return Box::pin(async move { fut.await.map_err(Into::into) });
        }
        let method = if self.known.contains(path) {
            path.to_owned()
        } else {
            "unknown".to_owned()
        };
        let start = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let result = fut.await.map_err(Into::into);
            let code = match &result {
                Ok(r) => code_of(r),
                Err(e) => super::errors::to_status(e.as_ref()).code(),
            };
            METRICS
                .rpc_requests
                .get_or_create(&labels([
                    ("method", &method),
                    ("code", &format!("{code:?}")),
                ]))
                .inc();
            METRICS
                .rpc_duration
                .get_or_create(&labels([("method", &method)]))
                .observe(start.elapsed().as_secs_f64());
            result
        })
    }
}
