//! The allocation service's queries: allocation rows (get, by request id,
//! insert, optimistic update), sagas due for a re-drive, and approval
//! decisions, each row mapped to and from an [`Allocation`] here and
//! nowhere else. Nothing here decides; `machine` does.

use diesel::prelude::*;
use gpualloc_domain::{AllocationId, PoolId, State, TenantId};
use gpualloc_storage::{DbConnection, Native, update_cached};

use crate::{
    Error,
    machine::Allocation,
    schema::{allocations, approvals},
};

/// One allocation as stored: resources and labels as JSON, ids and the
/// state as text. Only this file sees it; everything else gets an
/// [`Allocation`].
#[derive(Clone, Debug, PartialEq, Eq, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = allocations, treat_none_as_null = true)]
struct AllocRow {
    allocation_id: String,
    tenant: String,
    state: String,
    reason: String,
    resources: String,
    pool_id: Option<String>,
    priority: i32,
    request_id: Option<String>,
    fingerprint: String,
    labels: String,
    lease_micros: Option<i64>,
    version: i64,
    pool_version: i64,
    approved_time: Option<i64>,
    create_time: i64,
    update_time: i64,
    expire_time: Option<i64>,
    redrives: i32,
    redrive_time: Option<i64>,
    display_name: String,
}

impl TryFrom<AllocRow> for Allocation {
    type Error = Error;

    fn try_from(row: AllocRow) -> Result<Allocation, Error> {
        let stored = |what: &str, e: String| Error::Invariant(format!("stored {what}: {e}"));
        Ok(Allocation {
            id: AllocationId::parse(&row.allocation_id).map_err(|e| stored("id", e))?,
            tenant: TenantId::parse(row.tenant).map_err(|e| stored("tenant", e))?,
            state: State::parse(&row.state)
                .ok_or_else(|| stored("state", format!("{:?}", row.state)))?,
            reason: row.reason,
            resources: serde_json::from_str(&row.resources)
                .map_err(|e| stored("resources", e.to_string()))?,
            pool: row
                .pool_id
                .map(PoolId::parse)
                .transpose()
                .map_err(|e| stored("pool", e))?,
            priority: row.priority,
            request_id: row.request_id,
            fingerprint: row.fingerprint,
            // Labels are informational: unreadable ones are shown as none
            // rather than making the allocation unreadable.
            labels: serde_json::from_str(&row.labels).unwrap_or_default(),
            lease: row.lease_micros,
            version: row.version,
            pool_version: row.pool_version,
            approved_time: row.approved_time,
            create_time: row.create_time,
            update_time: row.update_time,
            expire_time: row.expire_time,
            redrives: row.redrives,
            redrive_time: row.redrive_time,
            display_name: row.display_name,
        })
    }
}

impl TryFrom<&Allocation> for AllocRow {
    type Error = Error;

    fn try_from(a: &Allocation) -> Result<AllocRow, Error> {
        let json =
            |v: Result<String, serde_json::Error>| v.map_err(|e| Error::Invariant(e.to_string()));
        Ok(AllocRow {
            allocation_id: a.id.to_string(),
            tenant: a.tenant.to_string(),
            state: a.state.as_str().to_owned(),
            reason: a.reason.clone(),
            resources: json(serde_json::to_string(&a.resources))?,
            pool_id: a.pool.as_ref().map(ToString::to_string),
            priority: a.priority,
            request_id: a.request_id.clone(),
            fingerprint: a.fingerprint.clone(),
            labels: json(serde_json::to_string(&a.labels))?,
            lease_micros: a.lease,
            version: a.version,
            pool_version: a.pool_version,
            approved_time: a.approved_time,
            create_time: a.create_time,
            update_time: a.update_time,
            expire_time: a.expire_time,
            redrives: a.redrives,
            redrive_time: a.redrive_time,
            display_name: a.display_name.clone(),
        })
    }
}

fn loaded(row: Option<AllocRow>) -> Result<Option<Allocation>, Error> {
    row.map(Allocation::try_from).transpose()
}

pub fn get(conn: &mut DbConnection, id: &AllocationId) -> Result<Option<Allocation>, Error> {
    let id = id.to_string();
    loaded(
        gpualloc_storage::native!(conn, |c| allocations::table
            .find(&id)
            .select(AllocRow::as_select())
            .get_result(c))
        .optional()?,
    )
}

// Lookups by a unique key use `get_result`, not `first`: `first` adds a
// `LIMIT ?`, and SQLite re-prepares a statement every time a parameter its
// plan depends on is bound again (the LIMIT is one), which cost the create
// path a quarter of its CPU (docs/benchmarks.md).
pub fn by_request_id(
    conn: &mut DbConnection,
    tenant: &TenantId,
    request_id: &str,
) -> Result<Option<Allocation>, Error> {
    loaded(
        gpualloc_storage::native!(conn, |c| allocations::table
            .filter(allocations::tenant.eq(tenant.as_str()))
            .filter(allocations::request_id.eq(request_id))
            .select(AllocRow::as_select())
            .get_result(c))
        .optional()?,
    )
}

pub fn insert(conn: &mut DbConnection, allocation: &Allocation) -> Result<(), Error> {
    diesel::insert_into(allocations::table)
        .values(AllocRow::try_from(allocation)?)
        .execute_native(conn)?;
    Ok(())
}

/// Writes `allocation` if the stored version is still `expected_version`
/// (optimistic concurrency: a lost race is retried by the caller).
pub fn update(
    conn: &mut DbConnection,
    allocation: &Allocation,
    expected_version: i64,
) -> Result<(), Error> {
    let row = AllocRow::try_from(allocation)?;
    let n = update_cached(
        allocations::table
            .filter(allocations::allocation_id.eq(&row.allocation_id))
            .filter(allocations::version.eq(expected_version)),
        &row,
    )
    .execute_native(conn)?;
    if n == 1 {
        Ok(())
    } else {
        Err(Error::Conflict(row.allocation_id.clone()))
    }
}

/// Allocations waiting on the pool (PENDING, CANCELLING) since before
/// `before` and due for a re-drive at `now`, oldest first.
pub fn waiting_since(
    conn: &mut DbConnection,
    before: i64,
    now: i64,
    limit: i64,
) -> Result<Vec<Allocation>, Error> {
    let rows = gpualloc_storage::native!(conn, |c| allocations::table
        .filter(allocations::state.eq_any([State::Pending.as_str(), State::Cancelling.as_str()]))
        .filter(allocations::update_time.lt(before))
        .filter(
            allocations::redrive_time
                .is_null()
                .or(allocations::redrive_time.lt(now)),
        )
        .order(allocations::update_time)
        .limit(limit)
        .select(AllocRow::as_select())
        .load(c))?;
    rows.into_iter().map(Allocation::try_from).collect()
}

pub fn record_decision(
    conn: &mut DbConnection,
    id: &AllocationId,
    decision: &str,
    reason: &str,
    decided_by: &str,
    now: i64,
) -> Result<(), Error> {
    diesel::insert_into(approvals::table)
        .values((
            approvals::allocation_id.eq(id.to_string()),
            approvals::decision.eq(decision),
            approvals::reason.eq(reason),
            approvals::decided_by.eq(decided_by),
            approvals::decide_time.eq(now),
        ))
        .execute_native(conn)?;
    Ok(())
}

pub fn decision(conn: &mut DbConnection, id: &AllocationId) -> Result<Option<String>, Error> {
    Ok(approvals::table
        .find(id.to_string())
        .select(approvals::decision)
        .get_result_native(conn)
        .optional()?)
}

/// Claims a re-drive of `allocation`: true for exactly one of several replicas
/// racing on it (and false if the saga moved meanwhile).
pub fn claim_redrive(
    conn: &mut DbConnection,
    allocation: &Allocation,
    next: i64,
) -> Result<bool, Error> {
    let id = allocation.id.to_string();
    let n = update_cached(
        allocations::table
            .filter(allocations::allocation_id.eq(&id))
            .filter(allocations::version.eq(allocation.version))
            .filter(allocations::redrives.eq(allocation.redrives)),
        (
            allocations::redrives.eq(allocation.redrives + 1),
            allocations::redrive_time.eq(next),
        ),
    )
    .execute_native(conn)?;
    Ok(n == 1)
}
