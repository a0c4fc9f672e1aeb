//! The allocation service's queries: allocation rows (get, by request id,
//! insert, optimistic update), sagas due for a re-drive, and approval
//! decisions. Nothing here decides; `ops` does.

use std::collections::BTreeMap;

use diesel::prelude::*;
use gpualloc_domain::{Resources, State, time};
use gpualloc_proto::{allocation::v1 as pb, resourcepool::v1 as rp};
use gpualloc_storage::{DbConnection, Native, update_cached};

use crate::{
    Error,
    schema::{allocations, approvals},
};

/// One allocation as stored.
#[derive(Clone, Debug, PartialEq, Eq, Queryable, Selectable, Insertable, AsChangeset)]
#[diesel(table_name = allocations, treat_none_as_null = true)]
pub struct AllocRow {
    pub allocation_id: String,
    pub tenant: String,
    pub state: String,
    pub reason: String,
    pub resources: String,
    pub pool_id: Option<String>,
    pub priority: i32,
    pub request_id: Option<String>,
    pub fingerprint: String,
    pub labels: String,
    pub lease_micros: Option<i64>,
    pub version: i64,
    pub pool_version: i64,
    pub approved_time: Option<i64>,
    pub create_time: i64,
    pub update_time: i64,
    pub expire_time: Option<i64>,
    pub redrives: i32,
    pub redrive_time: Option<i64>,
    pub display_name: String,
}

impl AllocRow {
    pub fn state(&self) -> Result<State, Error> {
        State::parse(&self.state)
            .ok_or_else(|| Error::Invariant(format!("stored state {:?}", self.state)))
    }

    pub fn resources(&self) -> Result<Resources, Error> {
        serde_json::from_str(&self.resources)
            .map_err(|e| Error::Invariant(format!("stored resources: {e}")))
    }

    pub fn labels(&self) -> BTreeMap<String, String> {
        serde_json::from_str(&self.labels).unwrap_or_default()
    }

    pub fn to_proto(&self) -> Result<pb::Allocation, Error> {
        let state = self.state()?;
        // Terminal states never change again: their last update is the end.
        let ended = matches!(state, State::Cancelled | State::Expired | State::Rejected);
        let early = matches!(state, State::Cancelled | State::Rejected);
        Ok(pb::Allocation {
            allocation_id: self.allocation_id.clone(),
            tenant: self.tenant.clone(),
            resources: Some(rp::Resources::from(&self.resources()?)),
            state: state.to_proto() as i32,
            reason: self.reason.clone(),
            pool: self.pool_id.clone().unwrap_or_default(),
            priority: self.priority,
            request_id: self.request_id.clone().unwrap_or_default(),
            labels: self.labels(),
            version: self.version,
            create_time: Some(time::to_timestamp(self.create_time)),
            update_time: Some(time::to_timestamp(self.update_time)),
            expire_time: self.expire_time.filter(|_| !early).map(time::to_timestamp),
            lease: self.lease_micros.map(time::to_duration),
            display_name: self.display_name.clone(),
            end_time: ended.then(|| time::to_timestamp(self.update_time)),
        })
    }
}

pub fn get(conn: &mut DbConnection, id: &str) -> Result<Option<AllocRow>, Error> {
    Ok(gpualloc_storage::native!(conn, |c| allocations::table
        .find(id)
        .select(AllocRow::as_select())
        .get_result(c))
    .optional()?)
}

// Lookups by a unique key use `get_result`, not `first`: `first` adds a
// `LIMIT ?`, and SQLite re-prepares a statement every time a parameter its
// plan depends on is bound again (the LIMIT is one), which cost the create
// path a quarter of its CPU (docs/benchmarks.md).
pub fn by_request_id(
    conn: &mut DbConnection,
    tenant: &str,
    request_id: &str,
) -> Result<Option<AllocRow>, Error> {
    Ok(gpualloc_storage::native!(conn, |c| allocations::table
        .filter(allocations::tenant.eq(tenant))
        .filter(allocations::request_id.eq(request_id))
        .select(AllocRow::as_select())
        .get_result(c))
    .optional()?)
}

pub fn insert(conn: &mut DbConnection, row: &AllocRow) -> Result<(), Error> {
    diesel::insert_into(allocations::table)
        .values(row)
        .execute_native(conn)?;
    Ok(())
}

/// Writes `row` if the stored version is still `expected_version`
/// (optimistic concurrency: a lost race is retried by the caller).
pub fn update(conn: &mut DbConnection, row: &AllocRow, expected_version: i64) -> Result<(), Error> {
    let n = update_cached(
        allocations::table
            .filter(allocations::allocation_id.eq(&row.allocation_id))
            .filter(allocations::version.eq(expected_version)),
        row,
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
) -> Result<Vec<AllocRow>, Error> {
    Ok(gpualloc_storage::native!(conn, |c| allocations::table
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
        .load(c))?)
}

pub fn record_decision(
    conn: &mut DbConnection,
    id: &str,
    decision: &str,
    reason: &str,
    decided_by: &str,
    now: i64,
) -> Result<(), Error> {
    diesel::insert_into(approvals::table)
        .values((
            approvals::allocation_id.eq(id),
            approvals::decision.eq(decision),
            approvals::reason.eq(reason),
            approvals::decided_by.eq(decided_by),
            approvals::decide_time.eq(now),
        ))
        .execute_native(conn)?;
    Ok(())
}

pub fn decision(conn: &mut DbConnection, id: &str) -> Result<Option<String>, Error> {
    Ok(approvals::table
        .find(id)
        .select(approvals::decision)
        .get_result_native(conn)
        .optional()?)
}

/// Claims a re-drive of `row`: true for exactly one of several replicas
/// racing on it (and false if the saga moved meanwhile).
pub fn claim_redrive(conn: &mut DbConnection, row: &AllocRow, next: i64) -> Result<bool, Error> {
    let n = update_cached(
        allocations::table
            .filter(allocations::allocation_id.eq(&row.allocation_id))
            .filter(allocations::version.eq(row.version))
            .filter(allocations::redrives.eq(row.redrives)),
        (
            allocations::redrives.eq(row.redrives + 1),
            allocations::redrive_time.eq(next),
        ),
    )
    .execute_native(conn)?;
    Ok(n == 1)
}
