//! The gRPC face of the viewer. It reads only its own database.

use std::sync::Arc;

use gpualloc_domain::{AllocationId, State, TenantId, Violations};
use gpualloc_platform::{Caller, CallerExt, DbHandle, status};
use gpualloc_proto::viewer::v1::{self as pb, viewer_service_server::ViewerService};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::{
    Error,
    store::{self, Cursor},
    usage::{self, RateCard},
    watch::{self, Changes, WatchStream},
};

const DEFAULT_PAGE: i64 = 100;
const MAX_PAGE: i64 = 1000;

/// Implements `gpualloc.viewer.v1.ViewerService`.
#[derive(Clone, Debug)]
pub struct ViewerApi {
    db: DbHandle,
    changes: Changes,
    stopping: CancellationToken,
    rates: Option<Arc<RateCard>>,
    watch_buffer: usize,
    watchers: Arc<watch::Limits>,
}

impl ViewerApi {
    pub fn new(
        db: DbHandle,
        changes: Changes,
        stopping: CancellationToken,
        rates: Option<RateCard>,
    ) -> Self {
        Self {
            db,
            changes,
            stopping,
            rates: rates.map(Arc::new),
            watch_buffer: watch::BUFFER,
            watchers: watch::Limits::new(watch::MAX_WATCHERS, watch::MAX_WATCHERS_PER_TENANT),
        }
    }

    /// Caps on open watch streams: in all, and per tenant.
    pub fn with_watch_limits(mut self, global: usize, per_tenant: usize) -> Self {
        self.watchers = watch::Limits::new(global, per_tenant);
        self
    }

    pub fn with_watch_buffer(mut self, n: usize) -> Self {
        self.watch_buffer = n;
        self
    }
}

fn not_found(id: &str) -> Status {
    status::not_found("allocation view", id)
}

/// The tenant a listing is for: a tenant lists itself; an administrator
/// names one or lists all.
/// Rows read at most per call when a label selector filters them: a rare
/// label must not turn one call into a scan of every allocation.
const MAX_SCANNED: i64 = 5_000;

fn cursor_of(row: &store::ViewRow) -> Cursor {
    Cursor {
        create_time: row.create_time,
        allocation_id: row.allocation_id.clone(),
    }
}

/// A page (newest first) of at most `page_size` rows, and where the next
/// page starts if there may be one. With a label selector, batches are
/// read and filtered until the page is full or [`MAX_SCANNED`] rows were
/// read; then the next page starts after the last row read, so a page may
/// hold fewer matches while more follow.
fn select(
    conn: &mut gpualloc_storage::DbConnection,
    tenant: Option<&TenantId>,
    states: &[State],
    mut cursor: Option<Cursor>,
    page_size: i64,
    selector: &store::Selector,
) -> Result<(Vec<store::ViewRow>, Option<Cursor>), Error> {
    if selector.is_empty() {
        let mut rows = store::list(conn, tenant, states, cursor.as_ref(), page_size + 1)?;
        let more = rows.len() as i64 > page_size;
        rows.truncate(page_size as usize);
        let next = if more {
            rows.last().map(cursor_of)
        } else {
            None
        };
        return Ok((rows, next));
    }
    let mut matched: Vec<store::ViewRow> = Vec::new();
    let mut scanned = 0;
    loop {
        let batch = store::list(conn, tenant, states, cursor.as_ref(), page_size + 1)?;
        let exhausted = (batch.len() as i64) <= page_size;
        for row in batch {
            scanned += 1;
            let last = cursor_of(&row);
            if selector.matches(&store::labels_of(&row)) {
                if matched.len() as i64 == page_size {
                    // A match beyond the page: there is a next page.
                    let next = matched.last().map(cursor_of);
                    return Ok((matched, next));
                }
                matched.push(row);
            }
            cursor = Some(last);
        }
        if exhausted {
            return Ok((matched, None));
        }
        if scanned >= MAX_SCANNED {
            return Ok((matched, cursor));
        }
    }
}

fn listing_tenant(caller: &Caller, requested: &str) -> Result<Option<TenantId>, Status> {
    if requested.is_empty() {
        return match (&caller.tenant, caller.admin) {
            (_, true) => Ok(None),
            (Some(t), false) => Ok(Some(t.clone())),
            (None, false) => Err(status::invalid_field("tenant", "tenant is required")),
        };
    }
    let t = TenantId::parse(requested).map_err(|e| status::invalid_field("tenant", e))?;
    if !caller.may_access(&t) {
        return Err(Status::permission_denied(format!(
            "a tenant may only read its own allocations, not {t}'s"
        )));
    }
    Ok(Some(t))
}

#[tonic::async_trait]
impl ViewerService for ViewerApi {
    async fn get_allocation_view(
        &self,
        request: Request<pb::GetAllocationViewRequest>,
    ) -> Result<Response<pb::AllocationView>, Status> {
        let caller = Caller::from_request(&request)?;
        let id = request.into_inner().allocation_id;
        AllocationId::parse(&id).map_err(|e| status::invalid_field("allocation_id", e))?;
        let key = id.clone();
        let found = self
            .db
            .get()?
            .read(move |conn| {
                let row = store::get(conn, &key)?;
                let positions = match &row {
                    Some(r) if r.state == State::Held.as_str() => store::hold_positions(conn)?,
                    _ => Default::default(),
                };
                Ok::<_, Error>(row.map(|r| (r, positions)))
            })
            .await?;
        match found {
            Some((row, positions))
                if caller.admin
                    || caller
                        .tenant
                        .as_ref()
                        .is_some_and(|t| t.as_str() == row.tenant) =>
            {
                Ok(Response::new(store::with_position(
                    row.to_proto()?,
                    &positions,
                )))
            }
            _ => Err(not_found(&id)),
        }
    }

    async fn list_allocation_views(
        &self,
        request: Request<pb::ListAllocationViewsRequest>,
    ) -> Result<Response<pb::ListAllocationViewsResponse>, Status> {
        let caller = Caller::from_request(&request)?;
        let req = request.into_inner();
        let tenant = listing_tenant(&caller, &req.tenant)?;
        let mut v = Violations::new();
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE,
            n if (1..=MAX_PAGE as i32).contains(&n) => i64::from(n),
            n => {
                v.add(
                    "page_size",
                    format!("must be between 1 and {MAX_PAGE} (got {n})"),
                );
                DEFAULT_PAGE
            }
        };
        let mut states = Vec::new();
        for (i, s) in req.states.iter().enumerate() {
            match State::from_proto(*s) {
                Some(s) => states.push(s),
                None => v.add(format!("states[{i}]"), format!("{s} is not a state")),
            }
        }
        let selector = match store::Selector::parse(&req.label_selector) {
            Ok(s) => s,
            Err(e) => {
                v.add("label_selector", e);
                store::Selector::default()
            }
        };
        let cursor = if req.page_token.is_empty() {
            None
        } else {
            match Cursor::decode(&req.page_token) {
                Some(c) => Some(c),
                None => {
                    v.add("page_token", "not a token from a previous response");
                    None
                }
            }
        };
        if !v.is_empty() {
            return Err(status::invalid_argument(&v));
        }
        let (rows, next, positions) = self
            .db
            .get()?
            .read(move |conn| {
                let (rows, next) = select(
                    conn,
                    tenant.as_ref(),
                    &states,
                    cursor.clone(),
                    page_size,
                    &selector,
                )?;
                let positions = if rows.iter().any(|r| r.state == State::Held.as_str()) {
                    store::hold_positions(conn)?
                } else {
                    Default::default()
                };
                Ok::<_, Error>((rows, next, positions))
            })
            .await?;
        let next_page_token = next.map(|c| c.encode()).unwrap_or_default();
        let allocations = rows
            .iter()
            .map(|r| Ok(store::with_position(r.to_proto()?, &positions)))
            .collect::<Result<_, Error>>()?;
        Ok(Response::new(pb::ListAllocationViewsResponse {
            allocations,
            next_page_token,
        }))
    }

    type WatchAllocationsStream = WatchStream;

    async fn watch_allocations(
        &self,
        request: Request<pb::WatchAllocationsRequest>,
    ) -> Result<Response<Self::WatchAllocationsStream>, Status> {
        let caller = Caller::from_request(&request)?;
        let req = request.into_inner();
        let tenant = listing_tenant(&caller, &req.tenant)?;
        let allocation_id = if req.allocation_id.is_empty() {
            None
        } else {
            let id = AllocationId::parse(&req.allocation_id)
                .map_err(|e| status::invalid_field("allocation_id", e))?;
            Some(id.to_string())
        };
        if req.resume_versions.len() > watch::MAX_RESUME {
            return Err(status::invalid_field(
                "resume_versions",
                format!(
                    "at most {} entries (got {}); reconnect without it for a fresh snapshot",
                    watch::MAX_RESUME,
                    req.resume_versions.len()
                ),
            ));
        }
        let mut resume = std::collections::HashMap::new();
        for (id, version) in req.resume_versions {
            let id = AllocationId::parse(&id).map_err(|e| {
                status::invalid_field(
                    &format!("resume_versions[{}]", gpualloc_platform::truncate(&id, 64)),
                    e,
                )
            })?;
            if version < 0 {
                return Err(status::invalid_field(
                    &format!("resume_versions[{id}]"),
                    "a version is at least 0",
                ));
            }
            resume.insert(id.to_string(), version);
        }
        let db = self.db.get()?.clone();
        let key = tenant.as_ref().map_or("*".to_owned(), |t| t.to_string());
        let slot = self.watchers.acquire(&key)?;
        let filter = watch::Filter {
            tenant: tenant.map(|t| t.to_string()),
            allocation_id,
            resume,
        };
        Ok(Response::new(watch::start(
            db,
            filter,
            self.changes.clone(),
            self.stopping.clone(),
            self.watch_buffer,
            slot,
        )))
    }

    async fn list_allocation_history(
        &self,
        request: Request<pb::ListAllocationHistoryRequest>,
    ) -> Result<Response<pb::ListAllocationHistoryResponse>, Status> {
        let caller = Caller::from_request(&request)?;
        let id = request.into_inner().allocation_id;
        AllocationId::parse(&id).map_err(|e| status::invalid_field("allocation_id", e))?;
        let key = id.clone();
        let (tenant, entries) = self
            .db
            .get()?
            .read(move |conn| {
                Ok::<_, Error>((
                    store::tenant_of_history(conn, &key)?,
                    store::history(conn, &key)?,
                ))
            })
            .await?;
        match tenant {
            Some(t) if caller.admin || caller.tenant.as_ref().is_some_and(|c| c.as_str() == t) => {
                Ok(Response::new(pb::ListAllocationHistoryResponse { entries }))
            }
            _ => Err(not_found(&id)),
        }
    }

    async fn get_tenant_summary(
        &self,
        request: Request<pb::GetTenantSummaryRequest>,
    ) -> Result<Response<pb::TenantSummary>, Status> {
        let caller = Caller::from_request(&request)?;
        let t = request.into_inner().tenant;
        let tenant = match listing_tenant(&caller, &t)? {
            Some(t) => t,
            None => return Err(status::invalid_field("tenant", "tenant is required")),
        };
        let summary = self
            .db
            .get()?
            .read(move |conn| store::summary(conn, &tenant))
            .await?;
        Ok(Response::new(summary))
    }

    async fn get_usage_report(
        &self,
        request: Request<pb::GetUsageReportRequest>,
    ) -> Result<Response<pb::UsageReport>, Status> {
        let caller = Caller::from_request(&request)?;
        let req = request.into_inner();
        // None: every tenant (an administrator who named none).
        let tenant = listing_tenant(&caller, &req.tenant)?;
        let now = gpualloc_domain::time::now_micros();
        let (month, bounds) = match (req.month.as_str(), &req.start_time, &req.end_time) {
            ("", None, None) => {
                let month = usage::month_of(now);
                let bounds = usage::month_bounds(&month)
                    .map_err(|e| status::internal("the current month", &e))?;
                (month, bounds)
            }
            (m, None, None) => (
                m.to_owned(),
                usage::month_bounds(m).map_err(|e| status::invalid_field("month", e))?,
            ),
            ("", Some(s), Some(e)) => {
                let (from, to) = (
                    gpualloc_domain::time::from_timestamp(s),
                    gpualloc_domain::time::from_timestamp(e),
                );
                if to <= from {
                    return Err(status::invalid_field(
                        "end_time",
                        "must be after start_time",
                    ));
                }
                (String::new(), (from, to))
            }
            ("", _, _) => {
                return Err(status::invalid_field(
                    "start_time",
                    "start_time and end_time go together",
                ));
            }
            (_, _, _) => {
                return Err(status::invalid_field(
                    "month",
                    "give a month or start_time and end_time, not both",
                ));
            }
        };
        let rates = match req.rate_card {
            Some(card) => Some(Arc::new(
                RateCard::from_request(card).map_err(|e| status::invalid_field("rate_card", e))?,
            )),
            None => self.rates.clone(),
        };
        let m = month.clone();
        let mut report = self
            .db
            .get()?
            .read(move |conn| {
                let tenants = match &tenant {
                    Some(t) => vec![t.to_string()],
                    None => store::usage_tenants(conn, bounds)?,
                };
                let mut reports = Vec::new();
                for t in &tenants {
                    let rows = store::usage_history(conn, t, bounds)?;
                    reports.push(usage::report(t, &m, bounds, &rows, now, rates.as_deref())?);
                }
                Ok::<_, Error>(match tenant {
                    Some(_) => reports.pop().unwrap_or_default(),
                    None => usage::combine(&m, bounds, reports, rates.as_deref()),
                })
            })
            .await?;
        if req.format == pb::ReportFormat::Csv as i32 {
            report.csv = usage::to_csv(&report);
        }
        Ok(Response::new(report))
    }
}
