//! Last line: any error from the layers below becomes a gRPC status a
//! client can act on (tonic would otherwise send `UNKNOWN`).

use std::task::{Context, Poll};

use tonic::{Code, Status};

use super::{BoxError, BoxFuture, Req, Res};

#[derive(Clone, Copy, Debug, Default)]
pub struct Layer;

impl<S> tower::Layer<S> for Layer {
    type Service = Errors<S>;
    fn layer(&self, inner: S) -> Errors<S> {
        Errors { inner }
    }
}

#[derive(Clone, Debug)]
pub struct Errors<S> {
    inner: S,
}

/// The status for an error of a layer: a status as itself (our timeout,
/// shedding and rate limits answer with statuses of their own), anything
/// else as `UNAVAILABLE` (the client may retry elsewhere).
pub fn to_status(e: &(dyn std::error::Error + 'static)) -> Status {
    if let Some(s) = e.downcast_ref::<Status>() {
        return s.clone();
    }
    Status::new(Code::Unavailable, format!("request failed: {e}"))
}

impl<S> tower::Service<Req> for Errors<S>
where
    S: tower::Service<Req, Response = Res> + Clone + Send + 'static,
    S::Future: Send,
    S::Error: Into<BoxError> + Send,
{
    type Response = Res;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<std::convert::Infallible>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // The layers below are always ready (they refuse in `call`); an
        // error here is reported by the call itself.
        match self.inner.poll_ready(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(_) => Poll::Ready(Ok(())),
        }
    }

    fn call(&mut self, req: Req) -> Self::Future {
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let result = match std::future::poll_fn(|cx| inner.poll_ready(cx)).await {
                Ok(()) => inner.call(req).await,
                Err(e) => Err(e),
            };
            Ok(result.unwrap_or_else(|e| {
                let e: BoxError = e.into();
                let status = to_status(e.as_ref());
                tracing::warn!(code = ?status.code(), error = %e, "request failed in the server stack");
                status.into_http()
            }))
        })
    }
}
