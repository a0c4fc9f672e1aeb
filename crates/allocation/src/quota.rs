//! The synchronous, advisory CheckQuota call to the resource pool. Its
//! answer can refuse a request early (over quota, unsatisfiable) or send it
//! to approval; when the pool cannot answer in time the request is accepted
//! as PENDING and the saga decides.

use std::{collections::BTreeMap, time::Duration};

use gpualloc_domain::{Resources, TenantId};
use gpualloc_platform::{Caller, propagation};
use gpualloc_proto::resourcepool::v1::{
    self as rp, resource_pool_service_client::ResourcePoolServiceClient,
};
use tonic::transport::{Channel, Endpoint};

/// What the pool said, or why it said nothing.
#[derive(Debug)]
pub enum Advice {
    Verdict(Box<rp::CheckQuotaResponse>),
    Unreachable(String),
}

#[derive(Clone, Debug)]
pub struct QuotaClient {
    client: ResourcePoolServiceClient<Channel>,
    timeout: Duration,
}

impl QuotaClient {
    /// Connects lazily: the allocation service starts (and accepts
    /// requests) while the pool is down.
    pub fn new(url: &str, timeout: Duration) -> anyhow::Result<Self> {
        let channel = Endpoint::from_shared(url.to_owned())?
            .connect_timeout(timeout)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true)
            .connect_lazy();
        Ok(Self {
            client: ResourcePoolServiceClient::new(channel),
            timeout,
        })
    }

    pub async fn check(
        &self,
        caller: &Caller,
        headers: &BTreeMap<String, String>,
        tenant: &TenantId,
        resources: &Resources,
    ) -> Advice {
        let mut request = tonic::Request::new(rp::CheckQuotaRequest {
            tenant: tenant.to_string(),
            resources: Some(rp::Resources::from(resources)),
        });
        request.set_timeout(self.timeout);
        caller.to_metadata(request.metadata_mut());
        propagation::inject(headers, request.metadata_mut());
        let mut client = self.client.clone();
        match tokio::time::timeout(self.timeout, client.check_quota(request)).await {
            Ok(Ok(r)) => Advice::Verdict(Box::new(r.into_inner())),
            Ok(Err(status)) => {
                Advice::Unreachable(format!("{:?}: {}", status.code(), status.message()))
            }
            Err(_) => Advice::Unreachable(format!("no answer within {:?}", self.timeout)),
        }
    }
}
