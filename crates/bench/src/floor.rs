//! The floor `create` is measured against: `CreateAllocation` behind the
//! same server stack (the platform's start-up, authentication, limits,
//! tracing and metrics layers, its relay publishing to a stream) that
//! commits the same rows through the same storage layer and outbox — the
//! allocation and its two events, built by the same `ops::create` — and
//! does nothing else: no checks beyond decoding, no quota check, no saga
//! consuming the events. What `create` costs above it is the allocation
//! service's own work on a request. Run as `gpualloc-bench node floor`,
//! against a NATS server of its own so its events reach no one.

use std::future::Future;

use gpualloc_allocation::{
    Config, MIGRATIONS, SERVICE_NAME, machine::NewAllocation, ops, wire::to_proto,
};
use gpualloc_domain::Resources;
use gpualloc_platform::{Caller, CallerExt, DbHandle, Platform, propagation};
use gpualloc_proto::allocation::v1::{
    self as pb,
    allocation_service_server::{AllocationService, AllocationServiceServer},
};
use gpualloc_saga::{Outbox, Relay};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

/// Runs the floor on `listener` until `shutdown` resolves.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let platform = Platform::new(
        "allocation",
        SERVICE_NAME,
        gpualloc_allocation::METRICS_PORT,
        config.common.clone(),
    );
    let floor = Floor {
        db: platform.db(),
        relay: platform.relay(),
        origin: platform.origin().to_owned(),
    };
    platform.start(MIGRATIONS, |_| {});
    platform
        .serve(listener, shutdown, |routes| {
            routes.add_service(AllocationServiceServer::new(floor))
        })
        .await
}

#[derive(Clone)]
struct Floor {
    db: DbHandle,
    relay: Relay,
    origin: String,
}

fn unimplemented<T>() -> Result<Response<T>, Status> {
    Err(Status::unimplemented("the floor only creates"))
}

#[tonic::async_trait]
impl AllocationService for Floor {
    async fn create_allocation(
        &self,
        request: Request<pb::CreateAllocationRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        let caller = Caller::from_request(&request)?;
        let headers = propagation::headers(request.metadata());
        let req = request.into_inner();
        let new = NewAllocation {
            tenant: caller
                .tenant_or_own(&req.tenant)
                .map_err(Status::invalid_argument)?,
            resources: Resources::try_from(req.resources.unwrap_or_default())
                .map_err(|e| Status::invalid_argument(e.to_string()))?,
            request_id: Some(req.request_id).filter(|r| !r.is_empty()),
            priority: req.priority,
            lease: None,
            labels: req.labels,
            display_name: req.display_name,
        };
        let db = self.db.get()?.clone();
        let allocation = Outbox::new(db, self.relay.clone(), &self.origin)
            .write(headers, move |conn, emit| {
                ops::create(conn, emit, &new, false)
            })
            .await
            .map_err(Status::from)?;
        Ok(Response::new(to_proto(&allocation)))
    }

    async fn get_allocation(
        &self,
        _: Request<pb::GetAllocationRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        unimplemented()
    }

    async fn cancel_allocation(
        &self,
        _: Request<pb::CancelAllocationRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        unimplemented()
    }

    async fn approve_allocation(
        &self,
        _: Request<pb::ApproveAllocationRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        unimplemented()
    }

    async fn reject_allocation(
        &self,
        _: Request<pb::RejectAllocationRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        unimplemented()
    }

    async fn renew_allocation(
        &self,
        _: Request<pb::RenewAllocationRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        unimplemented()
    }
}
