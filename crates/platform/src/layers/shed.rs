//! The concurrency limit with load shedding: at most `max` requests are
//! handled at once; the next is refused immediately with
//! `RESOURCE_EXHAUSTED` and a `grpc-retry-pushback-ms` trailer (gRPC's
//! retry pushback), instead of queueing until every caller times out.

use std::{
    sync::Arc,
    task::{Context, Poll},
};

use tokio::sync::Semaphore;
use tonic::{Status, metadata::MetadataMap};

use super::{BoxError, BoxFuture, Req, Res, exempt};

/// What a refused client is told to wait before retrying.
pub const PUSHBACK_MS: u64 = 100;
pub const PUSHBACK_HEADER: &str = "grpc-retry-pushback-ms";

#[derive(Clone, Debug)]
pub struct Layer {
    permits: Arc<Semaphore>,
    max: usize,
}

impl Layer {
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

impl<S> tower::Layer<S> for Layer {
    type Service = Shed<S>;
    fn layer(&self, inner: S) -> Shed<S> {
        Shed {
            inner,
            permits: self.permits.clone(),
            max: self.max,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Shed<S> {
    inner: S,
    permits: Arc<Semaphore>,
    max: usize,
}

/// RESOURCE_EXHAUSTED telling the client when to come back, twice: in the
/// `grpc-retry-pushback-ms` trailer that gRPC's own retry policy reads,
/// and as a RetryInfo detail that people and other clients read.
pub fn exhausted(message: String, pushback_ms: u64) -> Status {
    let mut md = MetadataMap::new();
    md.insert(PUSHBACK_HEADER, pushback_ms.into());
    <Status as tonic_types::StatusExt>::with_error_details_and_metadata(
        tonic::Code::ResourceExhausted,
        message,
        tonic_types::ErrorDetails::with_retry_info(Some(std::time::Duration::from_millis(
            pushback_ms,
        ))),
        md,
    )
}

impl<S> tower::Service<Req> for Shed<S>
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
        let permit = if exempt(req.uri().path()) {
            None
        } else {
            match self.permits.clone().try_acquire_owned() {
                Ok(p) => Some(p),
                Err(_) => {
                    let status = exhausted(
                        format!(
                            "overloaded: {} requests in progress; retry after {PUSHBACK_MS} ms",
                            self.max
                        ),
                        PUSHBACK_MS,
                    );
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
        };
        let fut = self.inner.call(req);
        Box::pin(async move {
            let response = fut.await.map_err(Into::into);
            drop(permit);
            response
        })
    }
}
