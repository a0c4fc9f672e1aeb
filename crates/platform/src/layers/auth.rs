//! Verifies the caller of every RPC ([`crate::auth::Authenticator`]) and
//! puts the [`crate::Caller`] into the request's extensions, where the
//! handlers and the rate limit read it. A request that cannot be
//! authenticated ends here with `UNAUTHENTICATED` and a message that says
//! why. In `jwt` mode every incoming `x-gpualloc-*` header is removed
//! first, so no layer or handler below can be fooled by one.
//!
//! Health checks and reflection stay open: probes and `grpcurl list`
//! carry no token.

use std::task::{Context, Poll};

use super::{BoxError, BoxFuture, Req, Res, exempt};
use crate::{
    auth::{AuthMode, Authenticator},
    identity::IDENTITY_PREFIX,
};

#[derive(Clone, Debug)]
pub struct Layer {
    auth: Authenticator,
}

impl Layer {
    pub fn new(auth: Authenticator) -> Self {
        Self { auth }
    }
}

impl<S> tower::Layer<S> for Layer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            auth: self.auth.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    auth: Authenticator,
}

/// Removes every header only the mesh may set.
fn strip_identity_headers(req: &mut Req) {
    let names: Vec<http::HeaderName> = req
        .headers()
        .keys()
        .filter(|k| k.as_str().starts_with(IDENTITY_PREFIX))
        .cloned()
        .collect();
    for name in names {
        req.headers_mut().remove(name);
    }
}

impl<S> tower::Service<Req> for Auth<S>
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
        if self.auth.mode() == AuthMode::Jwt {
            strip_identity_headers(&mut req);
        }
        // The clone takes the place of the service readied by poll_ready,
        // which this call uses once the caller is known.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        if exempt(req.uri().path()) {
            let fut = inner.call(req);
            return Box::pin(async move { fut.await.map_err(Into::into) });
        }
        let auth = self.auth.clone();
        Box::pin(async move {
            match auth.authenticate(req.headers()).await {
                Ok(caller) => {
                    req.extensions_mut().insert(caller);
                    inner.call(req).await.map_err(Into::into)
                }
                Err(status) => {
                    tracing::debug!(
                        message = status.message(),
                        "request refused: unauthenticated"
                    );
                    Ok(status.into_http())
                }
            }
        })
    }
}
