//! The tower stack in front of every service's gRPC routes, assembled in
//! [`stack`]. Each layer sits in its own module; the order, outermost
//! first, and why:
//!
//! 1. [`errors`] — turns any error a layer below returns into a proper
//!    gRPC status, so nothing reaches a client as `UNKNOWN`. Outermost so
//!    it sees every error.
//! 2. [`trace`] — the server span: joins the caller's trace (W3C or B3),
//!    assigns `x-request-id` when missing, records the status. Before the
//!    metrics and the guards so that refused requests are traced too.
//! 3. [`metrics`] — counts and times every request by method and code,
//!    including those the guards below refuse (they are what an operator
//!    alerts on). Methods that are not served are counted as `unknown`,
//!    so a scan of random paths cannot grow the label set.
//! 4. [`auth`] — verifies the caller (bearer JWT, or the mesh's identity
//!    headers) and puts it into the request's extensions; refuses with
//!    `UNAUTHENTICATED`. Before the rate limit, so that limits key on the
//!    verified tenant and not on whatever a header claims.
//! 5. [`rate_limit`] — optional per-tenant token bucket. Before the
//!    concurrency limit: a tenant over its rate must not take a slot from
//!    the others.
//! 6. [`shed`] — the concurrency limit: beyond it a request is refused at
//!    once with `RESOURCE_EXHAUSTED` and a retry pushback rather than
//!    queued (queueing only moves the collapse to the clients' deadlines).
//! 7. [`timeout`] — innermost, so it bounds the handler's time only; the
//!    caller's `grpc-timeout` shortens it.
//!
//! Health checks and reflection bypass authentication, the rate limit and
//! the concurrency limit: probes carry no token, and an overloaded service
//! must still answer them.

use std::{future::Future, pin::Pin, time::Duration};

use tonic::body::Body;

pub mod auth;
pub mod errors;
pub mod metrics;
pub mod rate_limit;
pub mod shed;
pub mod timeout;
pub mod trace;

pub type Req = http::Request<Body>;
pub type Res = http::Response<Body>;
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
pub type BoxFuture<E = BoxError> = Pin<Box<dyn Future<Output = Result<Res, E>> + Send>>;

/// What the stack enforces (from [`crate::CommonConfig`]).
#[derive(Clone, Copy, Debug)]
pub struct Protection {
    pub request_timeout: Duration,
    pub max_concurrent: usize,
    /// Requests per second and burst per tenant; `None`: no limit.
    pub tenant_rate: Option<(f64, u32)>,
}

/// Paths that every guard lets through.
pub fn exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path.starts_with("/grpc.reflection.")
}

type Stack = tower::layer::util::Stack<
    timeout::Layer,
    tower::layer::util::Stack<
        shed::Layer,
        tower::layer::util::Stack<
            rate_limit::Layer,
            tower::layer::util::Stack<
                auth::Layer,
                tower::layer::util::Stack<
                    metrics::Layer,
                    tower::layer::util::Stack<
                        trace::Layer,
                        tower::layer::util::Stack<errors::Layer, tower::layer::util::Identity>,
                    >,
                >,
            >,
        >,
    >,
>;

/// The whole stack, outermost first (see the module docs for the order).
pub fn stack(p: Protection, auth: crate::auth::Authenticator) -> tower::ServiceBuilder<Stack> {
    tower::ServiceBuilder::new()
        .layer(errors::Layer)
        .layer(trace::Layer)
        .layer(metrics::Layer::new())
        .layer(auth::Layer::new(auth))
        .layer(rate_limit::Layer::new(p.tenant_rate))
        .layer(shed::Layer::new(p.max_concurrent))
        .layer(timeout::Layer::new(p.request_timeout))
}
