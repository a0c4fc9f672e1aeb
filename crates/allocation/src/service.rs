//! The gRPC face of the allocation service.

use std::{collections::BTreeMap, time::Duration};

use gpualloc_domain::{AllocationId, Resources, Violations, time};
use gpualloc_platform::{Caller, CallerExt, DbHandle, propagation, status};
use gpualloc_proto::{
    allocation::v1::{self as pb, allocation_service_server::AllocationService},
    resourcepool::v1 as rp,
};
use gpualloc_saga::{Emitter, Outbox, Relay};
use gpualloc_storage::{
    DbConnection,
    diesel::result::{DatabaseErrorKind, Error as DieselError},
};
use tonic::{Request, Response, Status};

use crate::{
    Error,
    machine::{Allocation, NewAllocation},
    ops,
    quota::{Advice, QuotaClient},
    wire,
};

const MAX_LABELS: usize = 32;

/// Implements `gpualloc.allocation.v1.AllocationService`.
#[derive(Clone, Debug)]
pub struct AllocationApi {
    db: DbHandle,
    relay: Relay,
    origin: String,
    quota: QuotaClient,
}

impl AllocationApi {
    pub fn new(db: DbHandle, relay: Relay, origin: String, quota: QuotaClient) -> Self {
        Self {
            db,
            relay,
            origin,
            quota,
        }
    }

    async fn write<F>(
        &self,
        headers: BTreeMap<String, String>,
        mut f: F,
    ) -> Result<Allocation, Error>
    where
        F: FnMut(&mut DbConnection, &mut Emitter) -> Result<Allocation, Error> + Send + 'static,
    {
        let db = self
            .db
            .get()
            .map_err(|s| Error::Db(gpualloc_storage::DbError::Pool(s.message().to_owned())))?;
        Outbox::new(db.clone(), self.relay.clone(), &self.origin)
            .write(headers, move |conn, emit| f(conn, emit))
            .await
    }
}

fn respond(allocation: Allocation) -> Result<Response<pb::Allocation>, Status> {
    Ok(Response::new(wire::to_proto(&allocation)))
}

fn parse_id(s: &str) -> Result<AllocationId, Status> {
    AllocationId::parse(s).map_err(|e| status::invalid_field("allocation_id", e))
}

/// Longest display name.
const MAX_DISPLAY_NAME: usize = 128;

fn parse_create(
    req: pb::CreateAllocationRequest,
    caller: &Caller,
) -> Result<NewAllocation, Violations> {
    let mut v = Violations::new();
    let tenant = v.check("tenant", caller.tenant_or_own(&req.tenant));
    if req.display_name.chars().count() > MAX_DISPLAY_NAME {
        v.add(
            "display_name",
            format!("at most {MAX_DISPLAY_NAME} characters"),
        );
    } else if req.display_name.chars().any(char::is_control) {
        v.add("display_name", "no control characters");
    }
    let resources = Resources::parse_request(req.resources)
        .map_err(|e| v.extend_prefixed("resources", e))
        .ok();
    let request_id = match req.request_id.as_str() {
        "" => None,
        id if id.len() > 128 => {
            v.add("request_id", "must be at most 128 characters");
            None
        }
        id if !id.bytes().all(|b| b.is_ascii_graphic()) => {
            v.add("request_id", "must be printable ASCII without spaces");
            None
        }
        id => Some(id.to_owned()),
    };
    if !(0..=1000).contains(&req.priority) {
        v.add(
            "priority",
            format!("must be between 0 and 1000 (got {})", req.priority),
        );
    }
    let lease = req
        .lease
        .and_then(|d| v.check("lease", time::parse_duration(&d)));
    if req.labels.len() > MAX_LABELS {
        // One violation, not one per label: the error stays small.
        v.add(
            "labels",
            format!("at most {MAX_LABELS} labels (got {})", req.labels.len()),
        );
    }
    for (k, val) in req.labels.iter().take(MAX_LABELS) {
        // The key names the field: cut, like any echoed input.
        let k = gpualloc_platform::truncate(k, 64);
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b));
        if !key_ok {
            v.add(
                format!("labels[{k}]"),
                "keys are 1-63 letters, digits, '-', '_', '.' or '/'",
            );
        }
        if val.len() > 256 {
            v.add(format!("labels[{k}]"), "values are at most 256 characters");
        }
    }
    match (tenant, resources) {
        (Some(tenant), Some(resources)) if v.is_empty() => Ok(NewAllocation {
            tenant,
            resources,
            request_id,
            priority: req.priority,
            lease,
            labels: req.labels.into_iter().collect(),
            display_name: req.display_name,
        }),
        _ => Err(v),
    }
}

fn quota_refusal(r: rp::CheckQuotaResponse) -> Option<Error> {
    match rp::Verdict::try_from(r.verdict).unwrap_or(rp::Verdict::Unspecified) {
        rp::Verdict::ExceedsQuota => Some(Error::Quota {
            reason: "EXCEEDS_QUOTA",
            // The pool's reason already says "over quota: …".
            message: r.reason.clone(),
            violations: if r.violations.is_empty() {
                vec![("tenant".into(), r.reason)]
            } else {
                r.violations
                    .iter()
                    .map(|v| {
                        let description = if v.limit == 0 {
                            format!(
                                "the tenant's quota has no {} ({} requested)",
                                v.resource_class, v.requested
                            )
                        } else {
                            format!(
                                "{} requested, {} of {} in use",
                                v.requested, v.used, v.limit
                            )
                        };
                        (v.resource_class.clone(), description)
                    })
                    .collect()
            },
        }),
        rp::Verdict::Unsatisfiable => Some(Error::Quota {
            reason: "UNSATISFIABLE",
            message: format!("unsatisfiable: {}", r.reason),
            violations: Vec::new(),
        }),
        _ => None,
    }
}

/// The pool's refusal, as the caller's own status: same code, details
/// kept, message saying where it came from.
fn refused_check(status: Status) -> Status {
    let mut out = Status::with_details(
        status.code(),
        format!(
            "the resource pool refused the quota check: {}",
            status.message()
        ),
        status.details().to_vec().into(),
    );
    *out.metadata_mut() = status.metadata().clone();
    out
}

fn is_unique_violation(e: &Error) -> bool {
    matches!(
        e,
        Error::Query(DieselError::DatabaseError(
            DatabaseErrorKind::UniqueViolation,
            _
        ))
    )
}

#[tonic::async_trait]
impl AllocationService for AllocationApi {
    async fn create_allocation(
        &self,
        request: Request<pb::CreateAllocationRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        let caller = Caller::from_request(&request)?;
        let headers = propagation::headers(request.metadata());
        let new = parse_create(request.into_inner(), &caller)
            .map_err(|v| status::invalid_argument(&v))?;
        if !caller.may_access(&new.tenant) {
            return Err(Status::permission_denied(format!(
                "a tenant may only allocate for itself, not for {}",
                new.tenant
            )));
        }
        let db = self.db.get()?;
        // A retry with the same key must not ask the pool again.
        if new.request_id.is_some() {
            let n = new.clone();
            if let Some(row) = db.read_short(move |conn| ops::replay(conn, &n)).await? {
                return respond(row);
            }
        }
        let awaiting_approval = match self
            .quota
            .check(&caller, &headers, &new.tenant, &new.resources)
            .await
        {
            Advice::Verdict(r) => {
                let approval = r.requires_approval;
                if let Some(refusal) = quota_refusal(*r) {
                    return Err(refusal.into());
                }
                approval
            }
            Advice::Refused(status) => {
                tracing::info!(code = ?status.code(), message = status.message(), "CheckQuota refused the request");
                return Err(refused_check(*status));
            }
            Advice::Unreachable(why) => {
                tracing::warn!(reason = %why, "CheckQuota unavailable; accepting as PENDING, the saga decides");
                false
            }
        };
        let n = new.clone();
        match self
            .write(headers, move |conn, emit| {
                ops::create(conn, emit, &n, awaiting_approval)
            })
            .await
        {
            Ok(row) => {
                tracing::debug!(allocation_id = %row.id, tenant = %row.tenant, state = %row.state, "allocation created");
                respond(row)
            }
            // Two concurrent calls with one key: the loser returns the
            // winner's allocation.
            Err(e) if is_unique_violation(&e) => {
                let n = new.clone();
                match db.read_short(move |conn| ops::replay(conn, &n)).await? {
                    Some(row) => respond(row),
                    None => Err(e.into()),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn get_allocation(
        &self,
        request: Request<pb::GetAllocationRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        let caller = Caller::from_request(&request)?;
        let id = parse_id(&request.into_inner().allocation_id)?;
        let row = self
            .db
            .get()?
            .read_short(move |conn| ops::load_for(conn, &id, &caller))
            .await?;
        respond(row)
    }

    async fn cancel_allocation(
        &self,
        request: Request<pb::CancelAllocationRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        let caller = Caller::from_request(&request)?;
        let headers = propagation::headers(request.metadata());
        let req = request.into_inner();
        let id = parse_id(&req.allocation_id)?;
        if req.reason.len() > 1024 {
            return Err(status::invalid_field("reason", "at most 1024 characters"));
        }
        let row = self
            .write(headers, move |conn, emit| {
                ops::cancel(conn, emit, &id, &caller, &req.reason)
            })
            .await?;
        respond(row)
    }

    async fn approve_allocation(
        &self,
        request: Request<pb::ApproveAllocationRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        let caller = Caller::from_request(&request)?;
        caller.require_admin()?;
        let headers = propagation::headers(request.metadata());
        let id = parse_id(&request.into_inner().allocation_id)?;
        let row = self
            .write(headers, move |conn, emit| {
                ops::approve(conn, emit, &id, &caller)
            })
            .await?;
        respond(row)
    }

    async fn renew_allocation(
        &self,
        request: Request<pb::RenewAllocationRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        let caller = Caller::from_request(&request)?;
        let headers = propagation::headers(request.metadata());
        let req = request.into_inner();
        let id = parse_id(&req.allocation_id)?;
        let lease = parse_lease(req.lease)?;
        let row = self
            .write(headers, move |conn, emit| {
                ops::renew(conn, emit, &id, &caller, lease)
            })
            .await?;
        respond(row)
    }

    async fn reject_allocation(
        &self,
        request: Request<pb::RejectAllocationRequest>,
    ) -> Result<Response<pb::Allocation>, Status> {
        let caller = Caller::from_request(&request)?;
        caller.require_admin()?;
        let headers = propagation::headers(request.metadata());
        let req = request.into_inner();
        let id = parse_id(&req.allocation_id)?;
        if req.reason.len() > 1024 {
            return Err(status::invalid_field("reason", "at most 1024 characters"));
        }
        let row = self
            .write(headers, move |conn, emit| {
                ops::reject(conn, emit, &id, &caller, &req.reason)
            })
            .await?;
        respond(row)
    }
}

/// A renewal's lease: required, 1 s to 366 days.
fn parse_lease(d: Option<prost_types::Duration>) -> Result<i64, Status> {
    let d = d.ok_or_else(|| status::invalid_field("lease", "required: how long from now"))?;
    time::parse_duration(&d).map_err(|e| status::invalid_field("lease", e))
}

/// How long CheckQuota may take by default.
pub const DEFAULT_CHECK_TIMEOUT: Duration = Duration::from_millis(500);
