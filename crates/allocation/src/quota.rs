//! The synchronous, advisory CheckQuota call to the resource pool. Its
//! answer can refuse a request early (over quota, unsatisfiable) or send it
//! to approval; when the pool cannot answer in time — or the circuit
//! breaker ([`crate::breaker`]) holds calls back because it has not been
//! answering — the request is accepted as PENDING and the saga decides.

use std::{collections::BTreeMap, time::Duration};

use gpualloc_client::{Failover, Policy};
use gpualloc_domain::{Resources, TenantId};
use gpualloc_platform::{Caller, CallerExt, propagation};
use gpualloc_proto::resourcepool::v1::{
    self as rp, resource_pool_service_client::ResourcePoolServiceClient,
};
use gpualloc_telemetry::{labels, trace};
use tokio::time::Instant;
use tonic::Code;
use tracing::{Instrument, field::Empty};

use crate::{
    breaker::{Breaker, BreakerConfig, Outcome},
    metrics::METRICS,
};

/// What the pool said, or why it said nothing.
#[derive(Debug)]
pub enum Advice {
    Verdict(Box<rp::CheckQuotaResponse>),
    /// The pool answered with an error (the caller's token refused, a bad
    /// request, ...): the create fails with it. Only absence fails open.
    Refused(Box<tonic::Status>),
    Unreachable(String),
}

#[derive(Clone, Debug)]
pub struct QuotaClient {
    client: ResourcePoolServiceClient<Failover>,
    timeout: Duration,
    breaker: Breaker,
}

/// Whether a failed call says the pool is not there (a breaker failure)
/// rather than that it refused the request: `UNAVAILABLE`,
/// `DEADLINE_EXCEEDED`, or any error of the transport, whatever its code
/// ([`gpualloc_platform::status::from_transport`]).
pub fn is_unreachable(status: &tonic::Status) -> bool {
    matches!(status.code(), Code::Unavailable | Code::DeadlineExceeded)
        || gpualloc_platform::status::from_transport(status)
}

impl QuotaClient {
    /// Connects lazily: the allocation service starts (and accepts
    /// requests) while the pool is down. `url` may list several replicas,
    /// comma-separated: calls rotate over them and a replica that cannot
    /// take a call is skipped (the retry policy of `gpualloc-client`,
    /// within the one `timeout`).
    pub fn new(
        url: &str,
        timeout: Duration,
        breaker: BreakerConfig,
        tls: Option<tonic::transport::ClientTlsConfig>,
    ) -> anyhow::Result<Self> {
        let failover = Failover::new(gpualloc_client::split_urls(url), Policy::default(), |e| {
            let e = match &tls {
                Some(tls) => e.tls_config(tls.clone())?,
                None => e,
            };
            Ok(e.connect_timeout(timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_while_idle(true))
        })?;
        Ok(Self {
            client: ResourcePoolServiceClient::new(failover),
            timeout,
            breaker: Breaker::new("resource-pool", breaker),
        })
    }

    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    pub async fn check(
        &self,
        caller: &Caller,
        headers: &BTreeMap<String, String>,
        tenant: &TenantId,
        resources: &Resources,
    ) -> Advice {
        let start = Instant::now();
        let Some(ticket) = self.breaker.admit() else {
            observe("breaker_open", start);
            return Advice::Unreachable("circuit breaker open".into());
        };
        let span = tracing::info_span!(
            "CheckQuota",
            otel.name = "gpualloc.resourcepool.v1.ResourcePoolService/CheckQuota",
            otel.kind = "client",
            rpc.system = "grpc",
            rpc.service = "gpualloc.resourcepool.v1.ResourcePoolService",
            rpc.method = "CheckQuota",
            rpc.grpc.status_code = Empty,
        );
        let mut request = tonic::Request::new(rp::CheckQuotaRequest {
            tenant: tenant.to_string(),
            resources: Some(rp::Resources::from(resources)),
        });
        request.set_timeout(self.timeout);
        caller.to_metadata(request.metadata_mut());
        // The pool's server span becomes a child of this client span.
        propagation::inject(&trace::outgoing(&span, headers), request.metadata_mut());
        let mut client = self.client.clone();
        let result = tokio::time::timeout(self.timeout, client.check_quota(request))
            .instrument(span.clone())
            .await;
        let (advice, outcome, label) = match result {
            Ok(Ok(r)) => {
                span.record("rpc.grpc.status_code", 0);
                (
                    Advice::Verdict(Box::new(r.into_inner())),
                    Outcome::Answered,
                    "verdict",
                )
            }
            Ok(Err(status)) => {
                span.record("rpc.grpc.status_code", status.code() as i32);
                if is_unreachable(&status) {
                    (
                        Advice::Unreachable(format!("{:?}: {}", status.code(), status.message())),
                        Outcome::Unreachable,
                        "error",
                    )
                } else {
                    // The pool answered, if with an error (a bad request,
                    // a refused token): not a reason to stop calling, and
                    // not a reason to accept the request either.
                    (
                        Advice::Refused(Box::new(status)),
                        Outcome::Answered,
                        "refused",
                    )
                }
            }
            Err(_) => (
                Advice::Unreachable(format!("no answer within {:?}", self.timeout)),
                Outcome::Unreachable,
                "timeout",
            ),
        };
        self.breaker.record(ticket, outcome);
        observe(label, start);
        advice
    }
}

fn observe(outcome: &str, start: Instant) {
    let l = labels([("outcome", outcome)]);
    METRICS.check_quota.get_or_create(&l).inc();
    METRICS
        .check_quota_duration
        .get_or_create(&l)
        .observe(start.elapsed().as_secs_f64());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_absence_counts_against_the_pool() {
        assert!(is_unreachable(&tonic::Status::unavailable("down")));
        assert!(is_unreachable(&tonic::Status::deadline_exceeded("slow")));
        let broken = tonic::Status::from_error(Box::new(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "reset",
        )));
        assert!(is_unreachable(&broken), "{broken:?}");
        for answered in [
            tonic::Status::failed_precondition("over quota"),
            tonic::Status::invalid_argument("bad"),
            tonic::Status::permission_denied("no"),
            tonic::Status::cancelled("by the caller"),
        ] {
            assert!(!is_unreachable(&answered), "{answered:?}");
        }
    }
}
