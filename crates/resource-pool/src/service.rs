//! The gRPC face of the resource pool: parses requests into domain types
//! once, checks the caller, and runs the operations in [`crate::ops`].

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use gpualloc_domain::{Capacity, Class, GpuModel, PoolId, Resources, TenantId, Violations, time};
use gpualloc_platform::{Caller, CallerExt, DbHandle, propagation};
use gpualloc_proto::resourcepool::v1::{
    self as pb, resource_pool_service_server::ResourcePoolService,
};
use gpualloc_saga::{Emitter, Outbox, Relay};
use gpualloc_storage::DbConnection;
use tonic::{Request, Response, Status};

use crate::{
    Error,
    admin::{self, PoolSpec, QuotaSpec},
    engine::{self, TenantState, Verdict},
    mask::{PoolMask, QuotaMask},
    quota_cache::QuotaCache,
    store,
};

/// Implements `gpualloc.resourcepool.v1.ResourcePoolService`.
#[derive(Clone, Debug)]
pub struct PoolService {
    db: DbHandle,
    relay: Relay,
    origin: String,
    quota: Arc<QuotaCache>,
}

impl PoolService {
    /// `quota_cache_ttl` bounds how long `CheckQuota` may answer from
    /// counters read before another replica's write (zero: never).
    pub fn new(db: DbHandle, relay: Relay, origin: String, quota_cache_ttl: Duration) -> Self {
        Self {
            db,
            relay,
            origin,
            quota: Arc::new(QuotaCache::new(quota_cache_ttl)),
        }
    }

    /// Runs a state-changing operation in one transaction with its events.
    async fn write<T, F>(&self, headers: BTreeMap<String, String>, mut f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnMut(&mut DbConnection, &mut Emitter) -> Result<T, Error> + Send + 'static,
    {
        Ok(
            Outbox::new(self.db.get()?.clone(), self.relay.clone(), &self.origin)
                .write(headers, move |conn, emit| f(conn, emit))
                .await?,
        )
    }

    async fn read<T, F>(&self, f: F) -> Result<T, Status>
    where
        T: Send + 'static,
        F: FnMut(&mut DbConnection) -> Result<T, Error> + Send + 'static,
    {
        Ok(self.db.get()?.read(f).await?)
    }
}

fn parse_tenant(field: &str, s: String) -> Result<TenantId, Status> {
    TenantId::parse(s).map_err(|e| gpualloc_platform::status::invalid_field(field, e))
}

fn parse_pool_id(s: String) -> Result<PoolId, Status> {
    PoolId::parse(s).map_err(|e| gpualloc_platform::status::invalid_field("pool_id", e))
}

fn not_found_tenant(tenant: &TenantId) -> Status {
    Error::NotFound {
        kind: "tenant quota",
        id: tenant.to_string(),
    }
    .into()
}

fn quota_view(tenant: &str, row: &store::QuotaRow, state: &TenantState) -> pb::TenantQuota {
    let limits = Resources::from_lines(state.limits.iter().map(|(c, v)| (c, *v)));
    let usage = Resources::from_lines(state.granted.iter().map(|(c, v)| (c, *v)));
    let held_lines: Vec<(Class, i64)> = state
        .charged
        .iter()
        .map(|(c, v)| (c.clone(), v - state.granted.get(c).copied().unwrap_or(0)))
        .collect();
    let held = Resources::from_lines(held_lines.iter().map(|(c, v)| (c, *v)));
    pb::TenantQuota {
        tenant: tenant.to_owned(),
        limits: Some(pb::Resources::from(&limits)),
        approval_above: Some(pb::Resources::from(&state.approval_above)),
        usage: Some(pb::Resources::from(&usage)),
        held: Some(pb::Resources::from(&held)),
        max_hold: row.max_hold_micros.map(time::to_duration),
        version: row.version,
        update_time: Some(time::to_timestamp(row.update_time)),
    }
}

fn optional_duration(
    field: &str,
    d: Option<prost_types::Duration>,
    v: &mut Violations,
) -> Option<i64> {
    d.and_then(|d| v.check(field, time::parse_duration(&d)))
}

#[tonic::async_trait]
impl ResourcePoolService for PoolService {
    async fn check_quota(
        &self,
        request: Request<pb::CheckQuotaRequest>,
    ) -> Result<Response<pb::CheckQuotaResponse>, Status> {
        let caller = Caller::from_request(&request)?;
        let req = request.into_inner();
        let mut v = Violations::new();
        let tenant = v.check("tenant", caller.tenant_or_own(&req.tenant));
        let demand = match Resources::parse_request(req.resources) {
            Ok(d) => Some(d),
            Err(e) => {
                v.extend_prefixed("resources", e);
                None
            }
        };
        let (Some(tenant), Some(demand)) = (tenant, demand) else {
            return Err(gpualloc_platform::status::invalid_argument(&v));
        };
        if !caller.may_access(&tenant) {
            return Err(Status::permission_denied(format!(
                "a tenant may only check its own quota, not {tenant}'s"
            )));
        }
        let snapshot = self.quota.snapshot(self.db.get()?, tenant.as_str()).await?;
        let (pools, state) = (snapshot.pools, snapshot.tenant);
        let requires_approval = state
            .as_ref()
            .is_some_and(|s| !demand.above_threshold(&s.approval_above).is_empty());
        let mut resp = pb::CheckQuotaResponse {
            requires_approval,
            quota: state.as_ref().map(|s| {
                pb::Resources::from(&Resources::from_lines(
                    s.limits.iter().map(|(c, v)| (c, *v)),
                ))
            }),
            usage: state.as_ref().map(|s| {
                pb::Resources::from(&Resources::from_lines(
                    s.charged.iter().map(|(c, v)| (c, *v)),
                ))
            }),
            ..Default::default()
        };
        match engine::decide(&demand, state.as_deref(), &pools) {
            Verdict::Allowed(p) => {
                resp.verdict = pb::Verdict::Allowed as i32;
                resp.reason = format!("fits the quota and pool {} now", p.pool);
                resp.pool_id = p.pool.to_string();
            }
            Verdict::InsufficientCapacity => {
                resp.verdict = pb::Verdict::InsufficientCapacity as i32;
                resp.reason =
                    "fits the quota, but no pool has the free capacity now: it would be held"
                        .into();
            }
            Verdict::ExceedsQuota { reason, violations } => {
                resp.verdict = pb::Verdict::ExceedsQuota as i32;
                resp.reason = reason;
                resp.violations = violations
                    .into_iter()
                    .map(|q| pb::QuotaViolation {
                        resource_class: q.class.to_string(),
                        limit: q.limit,
                        used: q.used,
                        requested: q.requested,
                    })
                    .collect();
            }
            Verdict::Unsatisfiable(reason) => {
                resp.verdict = pb::Verdict::Unsatisfiable as i32;
                resp.reason = reason;
            }
        }
        if requires_approval {
            resp.reason.push_str(
                "; above the tenant's approval threshold, it would wait for an administrator",
            );
        }
        Ok(Response::new(resp))
    }

    async fn put_pool(
        &self,
        request: Request<pb::PutPoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        Caller::from_request(&request)?.require_admin()?;
        let headers = propagation::headers(request.metadata());
        let req = request.into_inner();
        let pool = req.pool.unwrap_or_default();
        let mut v = Violations::new();
        let mask = PoolMask::parse(&req.update_mask.map(|m| m.paths).unwrap_or_default())
            .map_err(|e| v.0.extend(e.0))
            .ok();
        let id = v.check("pool.pool_id", PoolId::parse(pool.pool_id));
        let capacity = match Capacity::try_from(pool.capacity.unwrap_or_default()) {
            Ok(c) => Some(c),
            Err(e) => {
                v.extend_prefixed("pool.capacity", e);
                None
            }
        };
        let max_hold = optional_duration("pool.max_hold", pool.max_hold, &mut v);
        let (Some(id), Some(capacity), Some(mask), true) = (id, capacity, mask, v.is_empty())
        else {
            return Err(gpualloc_platform::status::invalid_argument(&v));
        };
        let spec = PoolSpec {
            id,
            capacity,
            max_hold,
        };
        let record = self
            .write(headers, move |conn, emit| {
                admin::put_pool(conn, emit, &spec, &mask)
            })
            .await?;
        Ok(Response::new(admin::pool_to_proto(&record)))
    }

    async fn get_pool(
        &self,
        request: Request<pb::GetPoolRequest>,
    ) -> Result<Response<pb::Pool>, Status> {
        Caller::from_request(&request)?;
        let id = parse_pool_id(request.into_inner().pool_id)?;
        let pools = self.read(store::load_pools).await?;
        pools
            .iter()
            .find(|p| p.row.pool_id == id.as_str())
            .map(|p| Response::new(admin::pool_to_proto(p)))
            .ok_or_else(|| {
                Error::NotFound {
                    kind: "pool",
                    id: id.to_string(),
                }
                .into()
            })
    }

    async fn list_pools(
        &self,
        request: Request<pb::ListPoolsRequest>,
    ) -> Result<Response<pb::ListPoolsResponse>, Status> {
        Caller::from_request(&request)?;
        let model = request.into_inner().gpu_model;
        let model = if model.is_empty() {
            None
        } else {
            let parsed = GpuModel::parse(model).map_err(|e| {
                gpualloc_platform::status::invalid_argument(&Violations::single("gpu_model", e))
            })?;
            Some(Class::GpusOf(parsed))
        };
        let pools = self.read(store::load_pools).await?;
        Ok(Response::new(pb::ListPoolsResponse {
            pools: pools
                .iter()
                .filter(|p| {
                    model
                        .as_ref()
                        .is_none_or(|m| p.state.capacity.contains_key(m))
                })
                .map(admin::pool_to_proto)
                .collect(),
        }))
    }

    async fn delete_pool(
        &self,
        request: Request<pb::DeletePoolRequest>,
    ) -> Result<Response<pb::DeletePoolResponse>, Status> {
        Caller::from_request(&request)?.require_admin()?;
        let headers = propagation::headers(request.metadata());
        let id = parse_pool_id(request.into_inner().pool_id)?;
        let record = self
            .write(headers, move |conn, emit| {
                admin::delete_pool(conn, emit, &id)
            })
            .await?;
        Ok(Response::new(pb::DeletePoolResponse {
            pool: Some(admin::pool_to_proto(&record)),
        }))
    }

    async fn set_tenant_quota(
        &self,
        request: Request<pb::SetTenantQuotaRequest>,
    ) -> Result<Response<pb::TenantQuota>, Status> {
        Caller::from_request(&request)?.require_admin()?;
        let headers = propagation::headers(request.metadata());
        let req = request.into_inner();
        let mut v = Violations::new();
        let tenant = v.check("tenant", TenantId::parse(req.tenant));
        let limits = Resources::parse_limits(req.limits)
            .map_err(|e| v.extend_prefixed("limits", e))
            .ok();
        let approval_above = Resources::parse_limits(req.approval_above)
            .map_err(|e| v.extend_prefixed("approval_above", e))
            .ok();
        let max_hold = optional_duration("max_hold", req.max_hold, &mut v);
        let mask = QuotaMask::parse(&req.update_mask.map(|m| m.paths).unwrap_or_default())
            .map_err(|e| v.0.extend(e.0))
            .ok();
        let (Some(tenant), Some(limits), Some(approval_above), Some(mask), true) =
            (tenant, limits, approval_above, mask, v.is_empty())
        else {
            return Err(gpualloc_platform::status::invalid_argument(&v));
        };
        let spec = QuotaSpec {
            tenant: tenant.clone(),
            limits,
            approval_above,
            max_hold,
        };
        let t = tenant.clone();
        let quota = self
            .write(headers, move |conn, emit| {
                admin::set_quota(conn, emit, &spec, &mask)?;
                store::load_tenant(conn, t.as_str())
            })
            .await?;
        let (row, state) = quota.ok_or_else(|| not_found_tenant(&tenant))?;
        Ok(Response::new(quota_view(tenant.as_str(), &row, &state)))
    }

    async fn get_tenant_quota(
        &self,
        request: Request<pb::GetTenantQuotaRequest>,
    ) -> Result<Response<pb::TenantQuota>, Status> {
        let caller = Caller::from_request(&request)?;
        let tenant = caller
            .tenant_or_own(&request.into_inner().tenant)
            .map_err(|e| gpualloc_platform::status::invalid_field("tenant", e))?;
        if !caller.may_access(&tenant) {
            // Another tenant's quota is as invisible as a missing one.
            return Err(not_found_tenant(&tenant));
        }
        let t = tenant.clone();
        let quota = self
            .read(move |conn| store::load_tenant(conn, t.as_str()))
            .await?;
        let (row, state) = quota.ok_or_else(|| not_found_tenant(&tenant))?;
        Ok(Response::new(quota_view(tenant.as_str(), &row, &state)))
    }

    async fn list_held(
        &self,
        request: Request<pb::ListHeldRequest>,
    ) -> Result<Response<pb::ListHeldResponse>, Status> {
        let caller = Caller::from_request(&request)?;
        let req = request.into_inner();
        let tenant = if req.tenant.is_empty() {
            if caller.admin {
                None
            } else {
                caller.tenant.clone()
            }
        } else {
            Some(parse_tenant("tenant", req.tenant)?)
        };
        if let Some(t) = &tenant
            && !caller.may_access(t)
        {
            return Err(Status::permission_denied(format!(
                "a tenant may only list its own held requests, not {t}'s"
            )));
        }
        let pool = if req.pool_id.is_empty() {
            None
        } else {
            Some(parse_pool_id(req.pool_id)?)
        };
        let (rows, pools, releases) = self
            .read(|conn| {
                Ok((
                    store::held(conn)?,
                    store::pool_states(conn)?,
                    store::lease_ends(conn)?,
                ))
            })
            .await?;
        let queue = store::held_queue(&rows).map_err(Status::from)?;
        let leases: BTreeMap<String, i64> = rows
            .iter()
            .filter_map(|r| Some((r.allocation_id.clone(), r.lease_micros?)))
            .collect();
        let starts =
            engine::estimate_starts(&queue, &leases, &pools, &releases, time::now_micros());
        let pool_state = match &pool {
            Some(id) => Some(pools.iter().find(|p| &p.id == id).cloned().ok_or_else(|| {
                Status::from(Error::NotFound {
                    kind: "pool",
                    id: id.to_string(),
                })
            })?),
            None => None,
        };
        let mut held = Vec::new();
        for (i, r) in rows.iter().enumerate() {
            if tenant.as_ref().is_some_and(|t| t.as_str() != r.tenant) {
                continue;
            }
            let demand = r.demand().map_err(Status::from)?;
            if let Some(p) = &pool_state
                && !engine::ever_fits(&demand, std::slice::from_ref(p))
            {
                continue;
            }
            held.push(pb::HeldReservation {
                allocation_id: r.allocation_id.clone(),
                tenant: r.tenant.clone(),
                resources: Some(pb::Resources::from(&demand)),
                priority: r.priority,
                position: i as i64 + 1,
                request_time: Some(time::to_timestamp(r.request_time)),
                hold_deadline: r.hold_deadline.map(time::to_timestamp),
                estimated_start_time: starts.get(&r.allocation_id).map(|t| time::to_timestamp(*t)),
            });
        }
        Ok(Response::new(pb::ListHeldResponse { held }))
    }
}
