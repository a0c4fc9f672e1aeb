//! How a program calls a gpualloc service that runs as several replicas:
//! [`Failover`] is a tonic transport over one lazy channel per endpoint
//! that sends each call to the next replica in turn and, when a replica
//! cannot take the call, sends the same call to another one.
//!
//! The retry policy (docs/operations.md, "Client retry policy"): a call is
//! sent again, unchanged, on another endpoint when the attempt failed in the
//! transport (connection refused or reset, a stream refused by a GOAWAY) or
//! when the server answered `UNAVAILABLE` before any message (a replica that
//! is starting, draining or without its database). A replica that failed is
//! tried last for [`Policy::eject_for`]. After every endpoint failed, the
//! round is repeated after a backoff, [`Policy::rounds`] times in all. An
//! answer that carries a message, or any other status, is final: retrying it
//! could do twice what the server did once. That is safe for what is
//! retried because gpualloc's mutations are idempotent (creates by
//! `request_id`, puts by key, cancels of a cancelled allocation).
//!
//! tonic's own balanced channel (power of two choices) was not used: it can
//! not steer a retry away from the endpoint that just failed, and a lazy
//! endpoint that is down stays "ready" to it, so a retry could land on the
//! same dead replica again.

use std::{
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicU64, AtomicUsize, Ordering},
    },
    task::{Context, Poll},
    time::{Duration, Instant},
};

use bytes::Bytes;
use http_body_util::BodyExt as _;
use tonic::{
    body::Body,
    transport::{Channel, Endpoint},
};
use tower::{Service, ServiceExt as _};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How hard a call tries before its caller sees the failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Passes over every endpoint.
    pub rounds: u32,
    /// Wait before the second pass; doubled before each later one.
    pub backoff: Duration,
    /// How long an endpoint that failed is tried after the others.
    pub eject_for: Duration,
}

impl Default for Policy {
    /// Three passes, 100 ms then 200 ms apart: enough to ride over a
    /// replica's restart when another is up, and over a sub-second gap
    /// when none is; short enough that a real outage is reported quickly.
    fn default() -> Self {
        Self {
            rounds: 3,
            backoff: Duration::from_millis(100),
            eject_for: Duration::from_secs(2),
        }
    }
}

/// The endpoints given as one string: comma-separated, blanks ignored.
pub fn split_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .map(str::to_owned)
        .collect()
}

struct Member {
    url: String,
    channel: Channel,
    /// Milliseconds since `Inner::epoch` until which this endpoint is tried
    /// last.
    down_until: AtomicU64,
}

struct Inner {
    members: Vec<Member>,
    next: AtomicUsize,
    policy: Policy,
    epoch: Instant,
}

/// A tonic transport over several replicas of one service; clone it
/// freely (clones share the rotation and what failed).
#[derive(Clone)]
pub struct Failover(Arc<Inner>);

impl std::fmt::Debug for Failover {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Failover")
            .field("endpoints", &self.urls())
            .field("policy", &self.0.policy)
            .finish()
    }
}

/// Why a [`Failover`] could not be built.
#[derive(Debug)]
pub enum BuildError {
    NoEndpoint,
    Endpoint(String, tonic::transport::Error),
}

impl std::fmt::Display for BuildError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BuildError::NoEndpoint => f.write_str("no endpoint given"),
            BuildError::Endpoint(url, e) => write!(f, "endpoint {url:?}: {e}"),
        }
    }
}

impl std::error::Error for BuildError {}

impl Failover {
    /// One lazy channel per URL (nothing connects until the first call, so
    /// a program starts while replicas are down); `configure` sets timeouts
    /// and TLS on each endpoint.
    pub fn new(
        urls: impl IntoIterator<Item = String>,
        policy: Policy,
        configure: impl Fn(Endpoint) -> Result<Endpoint, tonic::transport::Error>,
    ) -> Result<Self, BuildError> {
        let mut members = Vec::new();
        for url in urls {
            let endpoint = Endpoint::from_shared(url.clone())
                .and_then(&configure)
                .map_err(|e| BuildError::Endpoint(url.clone(), e))?;
            members.push(Member {
                url,
                channel: endpoint.connect_lazy(),
                down_until: AtomicU64::new(0),
            });
        }
        if members.is_empty() {
            return Err(BuildError::NoEndpoint);
        }
        Ok(Self(Arc::new(Inner {
            members,
            next: AtomicUsize::new(0),
            policy,
            epoch: Instant::now(),
        })))
    }

    pub fn urls(&self) -> Vec<&str> {
        self.0.members.iter().map(|m| m.url.as_str()).collect()
    }

    fn now_ms(&self) -> u64 {
        self.0.epoch.elapsed().as_millis() as u64
    }

    /// This call's order: the rotation's next endpoint first, endpoints
    /// that failed lately last.
    fn order(&self) -> Vec<usize> {
        let n = self.0.members.len();
        let start = self.0.next.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        let (mut up, down): (Vec<usize>, Vec<usize>) = (0..n)
            .map(|i| (start + i) % n)
            .partition(|&i| self.0.members[i].down_until.load(Ordering::Relaxed) <= now);
        up.extend(down);
        up
    }

    fn eject(&self, i: usize) {
        let until = self.now_ms() + self.0.policy.eject_for.as_millis() as u64;
        self.0.members[i].down_until.store(until, Ordering::Relaxed);
    }

    async fn send(self, request: http::Request<Body>) -> Result<http::Response<Body>, BoxError> {
        let (parts, body) = request.into_parts();
        // A unary or server-streaming request is one message: kept to be
        // sent again. (A client stream would be read whole first; gpualloc
        // has none.)
        let body: Bytes = body.collect().await?.to_bytes();
        let policy = self.0.policy;
        let mut last: Option<Result<http::Response<Body>, BoxError>> = None;
        for round in 0..policy.rounds.max(1) {
            if round > 0 {
                tokio::time::sleep(policy.backoff * 2u32.saturating_pow(round - 1)).await;
            }
            for i in self.order() {
                let member = &self.0.members[i];
                let attempt = http::Request::from_parts(
                    parts.clone(),
                    Body::new(http_body_util::Full::new(body.clone())),
                );
                let result = match member.channel.clone().ready().await {
                    Ok(channel) => channel.call(attempt).await.map_err(BoxError::from),
                    Err(e) => Err(BoxError::from(e)),
                };
                match result {
                    Ok(response) if !unavailable(&response) => return Ok(response),
                    Ok(response) => {
                        tracing::debug!(endpoint = %member.url, "UNAVAILABLE; trying another replica");
                        last = Some(Ok(response));
                    }
                    Err(e) => {
                        tracing::debug!(endpoint = %member.url, error = %e, "transport failure; trying another replica");
                        last = Some(Err(e));
                    }
                }
                self.eject(i);
            }
        }
        last.unwrap_or_else(|| Err("no endpoint".into()))
    }
}

/// A trailers-only `UNAVAILABLE`: the server refused the call before
/// doing anything.
fn unavailable(response: &http::Response<Body>) -> bool {
    response
        .headers()
        .get("grpc-status")
        .is_some_and(|v| v.as_bytes() == b"14")
}

impl Service<http::Request<Body>> for Failover {
    type Response = http::Response<Body>;
    type Error = BoxError;
    type Future =
        Pin<Box<dyn Future<Output = Result<http::Response<Body>, BoxError>> + Send + 'static>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        // Each member channel has its own buffer; readiness is awaited per
        // attempt.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<Body>) -> Self::Future {
        Box::pin(self.clone().send(request))
    }
}
