//! One session: a channel per service (or one through a gateway), every
//! call carrying the context's bearer token.

use std::time::Duration;

use gpualloc_proto::{
    allocation::v1::allocation_service_client::AllocationServiceClient,
    resourcepool::v1::resource_pool_service_client::ResourcePoolServiceClient,
    viewer::v1::viewer_service_client::ViewerServiceClient,
};
use tonic::{
    Request, Status,
    metadata::MetadataValue,
    service::{Interceptor, interceptor::InterceptedService},
    transport::{Certificate, ClientTlsConfig},
};

use gpualloc_client::{Failover, Policy};

use crate::{Global, config, exit::Failure, output::Printer};

/// Adds `authorization: Bearer …` to every call.
#[derive(Clone, Debug)]
pub struct Bearer(Option<MetadataValue<tonic::metadata::Ascii>>);

impl Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Authed = InterceptedService<Failover, Bearer>;

/// The clients of one invocation, and how to print.
#[derive(Debug)]
pub struct Session {
    pub context: config::Resolved,
    pub allocations: AllocationServiceClient<Authed>,
    pub pools: ResourcePoolServiceClient<Authed>,
    pub viewer: ViewerServiceClient<Authed>,
    pub print: Printer,
}

/// The replicas at `addrs` (comma-separated), each a URL or `host:port`;
/// calls rotate over them and fail over (see `gpualloc-client`).
fn endpoint(addrs: &str, ca: Option<&Certificate>) -> Result<Failover, Failure> {
    let urls: Vec<String> = gpualloc_client::split_urls(addrs)
        .into_iter()
        .map(|a| {
            if a.contains("://") {
                a
            } else {
                format!("http://{a}")
            }
        })
        .collect();
    // Lazy: a command that needs only the viewer does not fail because the
    // allocation service is down.
    Failover::new(urls, Policy::default(), |ep| {
        let https = ep.uri().scheme_str() == Some("https");
        let ep = ep
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(30));
        if !https {
            return Ok(ep);
        }
        let mut tls = ClientTlsConfig::new();
        if let Some(ca) = ca {
            tls = tls.ca_certificate(ca.clone());
        }
        ep.tls_config(tls)
    })
    .map_err(|e| Failure::usage(format!("address {addrs:?}: {e}")))
}

impl Session {
    pub async fn open(global: &Global) -> Result<Session, Failure> {
        let context = config::resolve(global)?;
        let ca = match &context.ca_file {
            Some(p) => {
                Some(Certificate::from_pem(std::fs::read(p).map_err(|e| {
                    Failure::usage(format!("CA file {}: {e}", p.display()))
                })?))
            }
            None => None,
        };
        let bearer = Bearer(
            context
                .token
                .as_ref()
                .map(|t| {
                    MetadataValue::try_from(format!("Bearer {t}"))
                        .map_err(|_| Failure::usage("the token is not a valid header value"))
                })
                .transpose()?,
        );
        let alloc = endpoint(&context.allocation, ca.as_ref())?;
        let pool = endpoint(&context.resource_pool, ca.as_ref())?;
        let viewer = endpoint(&context.viewer, ca.as_ref())?;
        Ok(Session {
            allocations: AllocationServiceClient::with_interceptor(alloc, bearer.clone()),
            pools: ResourcePoolServiceClient::with_interceptor(pool, bearer.clone()),
            viewer: ViewerServiceClient::with_interceptor(viewer, bearer),
            print: Printer::new(global),
            context,
        })
    }
}
