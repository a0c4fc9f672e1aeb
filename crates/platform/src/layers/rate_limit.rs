//! Optional per-tenant rate limit: a token bucket per verified tenant (the
//! [`crate::Caller`] the auth layer put into the request; administrators
//! share one bucket). Over its
//! rate a tenant gets `RESOURCE_EXHAUSTED` with a pushback telling when
//! its next token is due, and the other tenants are not affected.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Instant,
};

use super::{BoxError, BoxFuture, Req, Res, exempt, shed::exhausted};
use crate::Caller;

/// Buckets kept before idle ones are dropped.
const MAX_BUCKETS: usize = 100_000;

#[derive(Clone, Debug)]
pub struct Layer {
    limiter: Option<Arc<Limiter>>,
}

impl Layer {
    pub fn new(rate: Option<(f64, u32)>) -> Self {
        Self {
            limiter: rate
                .filter(|(r, _)| *r > 0.0)
                .map(|(rate, burst)| Arc::new(Limiter::new(rate, burst))),
        }
    }
}

impl<S> tower::Layer<S> for Layer {
    type Service = RateLimit<S>;
    fn layer(&self, inner: S) -> RateLimit<S> {
        RateLimit {
            inner,
            limiter: self.limiter.clone(),
        }
    }
}

#[derive(Clone, Debug)]
pub struct RateLimit<S> {
    inner: S,
    limiter: Option<Arc<Limiter>>,
}

#[derive(Debug)]
pub struct Limiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Limiter {
    pub fn new(rate: f64, burst: u32) -> Self {
        Self {
            rate,
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token for `key`, or says how long until one is due.
    pub fn take(&self, key: &str, now: Instant) -> Result<(), std::time::Duration> {
        let mut buckets = match self.buckets.lock() {
            Ok(b) => b,
            Err(poisoned) => poisoned.into_inner(),
        };
        if buckets.len() >= MAX_BUCKETS && !buckets.contains_key(key) {
            // A full bucket is the same as none: drop those.
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = buckets.entry(key.to_owned()).or_insert((self.burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(std::time::Duration::from_secs_f64(
                (1.0 - *tokens) / self.rate,
            ))
        }
    }
}

impl<S> tower::Service<Req> for RateLimit<S>
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
        if let Some(limiter) = &self.limiter
            && !exempt(req.uri().path())
        {
            let tenant = match req.extensions().get::<Caller>() {
                Some(Caller {
                    tenant: Some(t), ..
                }) => t.as_str(),
                Some(_) => "(admin)",
                None => "",
            };
            if let Err(wait) = limiter.take(tenant, Instant::now()) {
                let ms = wait.as_millis().max(1) as u64;
                let status = exhausted(
                    format!("tenant {tenant:?} is over its request rate; retry after {ms} ms"),
                    ms,
                );
                return Box::pin(async move { Ok(status.into_http()) });
            }
        }
        let fut = self.inner.call(req);
        Box::pin(async move { fut.await.map_err(Into::into) })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn buckets_refill_at_the_rate_and_are_per_tenant() {
        let l = Limiter::new(10.0, 2);
        let t0 = Instant::now();
        assert!(l.take("a", t0).is_ok());
        assert!(l.take("a", t0).is_ok());
        let wait = l.take("a", t0).unwrap_err();
        assert!(wait <= Duration::from_millis(100) && wait > Duration::from_millis(90));
        // Another tenant is not affected.
        assert!(l.take("b", t0).is_ok());
        // 100 ms later one token is back.
        assert!(l.take("a", t0 + Duration::from_millis(100)).is_ok());
        assert!(l.take("a", t0 + Duration::from_millis(100)).is_err());
    }
}
