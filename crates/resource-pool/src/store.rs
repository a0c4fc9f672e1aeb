//! Queries of the resource-pool database. Counter updates are guarded (the
//! `WHERE` re-checks the bound) and backed by CHECK constraints, so a bug
//! elsewhere fails the transaction instead of over-allocating.

use std::collections::{BTreeMap, BTreeSet};

use diesel::prelude::*;
use gpualloc_domain::{Class, GpuModel, PoolId, Resources};
use gpualloc_storage::{DbConnection, Native, update_cached};

use crate::{
    Error,
    engine::{Held, PoolState, TenantState},
    schema::{pool_resources, pools, reservations, tenant_quotas, tenant_usage},
};

/// Where a reservation stands; stored as its name (this is the one
/// mapping between the two).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReservationState {
    /// Waiting in the hold queue for capacity; charged to the tenant.
    Held,
    /// Placed on a pool; counted in the pool and charged to the tenant.
    Granted,
    /// Ended after a hold or a grant; nothing counted any more.
    Released,
    /// Refused; nothing was ever counted.
    Rejected,
}

impl ReservationState {
    pub const fn as_str(self) -> &'static str {
        match self {
            ReservationState::Held => "HELD",
            ReservationState::Granted => "GRANTED",
            ReservationState::Released => "RELEASED",
            ReservationState::Rejected => "REJECTED",
        }
    }

    pub fn parse(s: &str) -> Result<Self, Error> {
        [
            ReservationState::Held,
            ReservationState::Granted,
            ReservationState::Released,
            ReservationState::Rejected,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
        .ok_or_else(|| Error::Invariant(format!("stored reservation state {s:?}")))
    }
}

/// Lock name serialising every decision that reads and changes counters.
pub const PLACEMENT_LOCK: &str = "placement";

fn parse_class(s: &str) -> Result<Class, Error> {
    s.parse()
        .map_err(|e| Error::Invariant(format!("stored class {s:?}: {e}")))
}

#[derive(Clone, Debug, Queryable, Selectable)]
#[diesel(table_name = pools)]
pub struct PoolRow {
    pub pool_id: String,
    pub max_hold_micros: Option<i64>,
    pub version: i64,
    pub create_time: i64,
    pub update_time: i64,
}

/// A pool with its counters and metadata.
#[derive(Clone, Debug)]
pub struct PoolRecord {
    pub row: PoolRow,
    pub state: PoolState,
}

pub fn load_pools(conn: &mut DbConnection) -> Result<Vec<PoolRecord>, Error> {
    let rows: Vec<PoolRow> = gpualloc_storage::native!(conn, |c| pools::table
        .order(pools::pool_id)
        .select(PoolRow::as_select())
        .load(c))?;
    let resources: Vec<(String, String, i64, i64)> = pool_resources::table
        .select((
            pool_resources::pool_id,
            pool_resources::class,
            pool_resources::capacity,
            pool_resources::used,
        ))
        .load_native(conn)?;
    type Counters = BTreeMap<Class, i64>;
    let mut by_pool: BTreeMap<String, (Counters, Counters)> = BTreeMap::new();
    for (pool, class, capacity, used) in resources {
        let class = parse_class(&class)?;
        let entry = by_pool.entry(pool).or_default();
        entry.0.insert(class.clone(), capacity);
        entry.1.insert(class, used);
    }
    rows.into_iter()
        .map(|row| {
            let (capacity, used) = by_pool.remove(&row.pool_id).unwrap_or_default();
            let id = PoolId::parse(row.pool_id.clone()).map_err(Error::Invariant)?;
            Ok(PoolRecord {
                state: PoolState {
                    id,
                    max_hold: row.max_hold_micros,
                    capacity,
                    used,
                },
                row,
            })
        })
        .collect()
}

pub fn pool_states(conn: &mut DbConnection) -> Result<Vec<PoolState>, Error> {
    Ok(load_pools(conn)?.into_iter().map(|p| p.state).collect())
}

/// Adds `lines` to a pool's usage, refusing to pass capacity.
pub fn take_pool(
    conn: &mut DbConnection,
    pool: &PoolId,
    lines: &[(Class, i64)],
) -> Result<(), Error> {
    for (class, v) in lines {
        let n = update_cached(
            pool_resources::table
                .filter(pool_resources::pool_id.eq(pool.as_str()))
                .filter(pool_resources::class.eq(class.to_string()))
                .filter((pool_resources::used + *v).le(pool_resources::capacity)),
            pool_resources::used.eq(pool_resources::used + *v),
        )
        .execute_native(conn)?;
        if n != 1 {
            return Err(Error::Invariant(format!(
                "{class} of {v} does not fit pool {pool}"
            )));
        }
    }
    Ok(())
}

/// Returns `lines` to a pool.
pub fn release_pool(
    conn: &mut DbConnection,
    pool: &str,
    lines: &[(Class, i64)],
) -> Result<(), Error> {
    for (class, v) in lines {
        let n = update_cached(
            pool_resources::table
                .filter(pool_resources::pool_id.eq(pool))
                .filter(pool_resources::class.eq(class.to_string()))
                .filter(pool_resources::used.ge(*v)),
            pool_resources::used.eq(pool_resources::used - *v),
        )
        .execute_native(conn)?;
        if n != 1 {
            return Err(Error::Invariant(format!(
                "releasing {class} of {v} from pool {pool}"
            )));
        }
    }
    Ok(())
}

#[derive(Clone, Debug, Queryable, Selectable)]
#[diesel(table_name = tenant_quotas)]
pub struct QuotaRow {
    pub tenant: String,
    pub approval_above: String,
    pub max_hold_micros: Option<i64>,
    pub version: i64,
    pub update_time: i64,
}

pub fn load_tenant(
    conn: &mut DbConnection,
    tenant: &str,
) -> Result<Option<(QuotaRow, TenantState)>, Error> {
    let Some(row) = gpualloc_storage::native!(conn, |c| tenant_quotas::table
        .find(tenant)
        .select(QuotaRow::as_select())
        .get_result(c))
    .optional()?
    else {
        return Ok(None);
    };
    let usage: Vec<(String, i64, i64, i64)> = tenant_usage::table
        .filter(tenant_usage::tenant.eq(tenant))
        .select((
            tenant_usage::class,
            tenant_usage::quota_limit,
            tenant_usage::charged,
            tenant_usage::granted,
        ))
        .load_native(conn)?;
    let mut state = TenantState {
        approval_above: serde_json::from_str(&row.approval_above)
            .map_err(|e| Error::Invariant(format!("stored approval_above: {e}")))?,
        max_hold: row.max_hold_micros,
        ..Default::default()
    };
    for (class, limit, charged, granted) in usage {
        let class = parse_class(&class)?;
        state.limits.insert(class.clone(), limit);
        state.charged.insert(class.clone(), charged);
        state.granted.insert(class, granted);
    }
    Ok(Some((row, state)))
}

/// Changes a tenant's counters by `sign` × `lines`: `charged` always,
/// `granted` when `granted` is set. Refuses to pass the quota.
pub fn charge_tenant(
    conn: &mut DbConnection,
    tenant: &str,
    lines: &[(Class, i64)],
    sign: i64,
    charged: bool,
    granted: bool,
) -> Result<(), Error> {
    for (class, v) in lines {
        let d = sign * v;
        let dc = if charged { d } else { 0 };
        let dg = if granted { d } else { 0 };
        let n = update_cached(
            tenant_usage::table
                .filter(tenant_usage::tenant.eq(tenant))
                .filter(tenant_usage::class.eq(class.to_string()))
                .filter((tenant_usage::charged + dc).le(tenant_usage::quota_limit))
                .filter((tenant_usage::charged + dc).ge(tenant_usage::granted + dg))
                .filter((tenant_usage::granted + dg).ge(0)),
            (
                tenant_usage::charged.eq(tenant_usage::charged + dc),
                tenant_usage::granted.eq(tenant_usage::granted + dg),
            ),
        )
        .execute_native(conn)?;
        if n != 1 {
            return Err(Error::Invariant(format!(
                "tenant {tenant}: changing {class} by {d} breaks its quota counters"
            )));
        }
    }
    Ok(())
}

#[derive(Clone, Debug, Queryable, Selectable)]
#[diesel(table_name = reservations)]
pub struct ReservationRow {
    pub allocation_id: String,
    pub tenant: String,
    pub state: String,
    pub demand: String,
    pub pool_id: Option<String>,
    pub gpu_model: Option<String>,
    pub priority: i32,
    pub request_time: i64,
    pub lease_micros: Option<i64>,
    pub hold_deadline: Option<i64>,
    pub expire_time: Option<i64>,
    pub reason: String,
    pub outcome: Option<String>,
    pub version: i64,
    pub create_time: i64,
    pub update_time: i64,
}

impl ReservationRow {
    pub fn state(&self) -> Result<ReservationState, Error> {
        ReservationState::parse(&self.state)
    }

    pub fn demand(&self) -> Result<Resources, Error> {
        serde_json::from_str(&self.demand)
            .map_err(|e| Error::Invariant(format!("stored demand: {e}")))
    }

    pub fn model(&self) -> Result<Option<GpuModel>, Error> {
        self.gpu_model
            .as_deref()
            .map(GpuModel::parse)
            .transpose()
            .map_err(Error::Invariant)
    }

    /// The pool-class amounts it holds (when granted).
    pub fn pool_lines(&self) -> Result<Vec<(Class, i64)>, Error> {
        Ok(self.demand()?.pool_lines(self.model()?.as_ref()))
    }
}

#[derive(Insertable)]
#[diesel(table_name = reservations)]
pub struct NewReservation<'a> {
    pub allocation_id: &'a str,
    pub tenant: &'a str,
    pub state: &'a str,
    pub demand: String,
    pub pool_id: Option<&'a str>,
    pub gpu_model: Option<&'a str>,
    pub priority: i32,
    pub request_time: i64,
    pub lease_micros: Option<i64>,
    pub hold_deadline: Option<i64>,
    pub expire_time: Option<i64>,
    pub reason: &'a str,
    pub outcome: Option<&'a str>,
    pub version: i64,
    pub create_time: i64,
    pub update_time: i64,
}

pub fn insert_reservation(conn: &mut DbConnection, r: &NewReservation<'_>) -> Result<(), Error> {
    diesel::insert_into(reservations::table)
        .values(r)
        .execute_native(conn)?;
    Ok(())
}

pub fn get_reservation(
    conn: &mut DbConnection,
    allocation_id: &str,
) -> Result<Option<ReservationRow>, Error> {
    Ok(gpualloc_storage::native!(conn, |c| reservations::table
        .find(allocation_id)
        .select(ReservationRow::as_select())
        .get_result(c))
    .optional()?)
}

/// Moves a reservation from `from` to `to` (guarded on `from`, so a
/// concurrent move makes this fail rather than apply twice).
pub fn move_reservation(
    conn: &mut DbConnection,
    r: &ReservationRow,
    to: ReservationState,
    reason: &str,
    outcome: Option<&str>,
    placed: Option<(&str, Option<&str>, Option<i64>)>,
    now: i64,
) -> Result<i64, Error> {
    let version = r.version + 1;
    let q = reservations::table
        .filter(reservations::allocation_id.eq(&r.allocation_id))
        .filter(reservations::state.eq(&r.state))
        .filter(reservations::version.eq(r.version));
    let n = match placed {
        Some((pool, model, expire)) => update_cached(
            q,
            (
                reservations::state.eq(to.as_str()),
                reservations::reason.eq(reason),
                reservations::outcome.eq(outcome),
                reservations::pool_id.eq(Some(pool)),
                reservations::gpu_model.eq(model),
                reservations::expire_time.eq(expire),
                reservations::version.eq(version),
                reservations::update_time.eq(now),
            ),
        )
        .execute_native(conn)?,
        None => update_cached(
            q,
            (
                reservations::state.eq(to.as_str()),
                reservations::reason.eq(reason),
                reservations::outcome.eq(outcome),
                reservations::version.eq(version),
                reservations::update_time.eq(now),
            ),
        )
        .execute_native(conn)?,
    };
    if n != 1 {
        return Err(Error::Invariant(format!(
            "reservation {} changed under the placement lock",
            r.allocation_id
        )));
    }
    Ok(version)
}

pub fn held(conn: &mut DbConnection) -> Result<Vec<ReservationRow>, Error> {
    Ok(gpualloc_storage::native!(conn, |c| reservations::table
        .filter(reservations::state.eq(ReservationState::Held.as_str()))
        .order((
            reservations::priority.desc(),
            reservations::request_time,
            reservations::allocation_id,
        ))
        .select(ReservationRow::as_select())
        .load(c))?)
}

pub fn held_queue(rows: &[ReservationRow]) -> Result<Vec<Held>, Error> {
    rows.iter()
        .map(|r| {
            Ok(Held {
                allocation_id: r.allocation_id.clone(),
                priority: r.priority,
                request_time: r.request_time,
                demand: r.demand()?,
            })
        })
        .collect()
}

/// The capacity granted reservations give back when their leases end.
pub fn lease_ends(conn: &mut DbConnection) -> Result<Vec<crate::engine::Release>, Error> {
    let rows: Vec<ReservationRow> = gpualloc_storage::native!(conn, |c| reservations::table
        .filter(reservations::state.eq(ReservationState::Granted.as_str()))
        .filter(reservations::expire_time.is_not_null())
        .select(ReservationRow::as_select())
        .load(c))?;
    rows.iter()
        .filter_map(|r| Some((r, r.expire_time?, r.pool_id.as_deref()?)))
        .map(|(r, at, pool)| {
            Ok(crate::engine::Release {
                at,
                pool: PoolId::parse(pool.to_owned()).map_err(Error::Invariant)?,
                lines: r.pool_lines()?,
            })
        })
        .collect()
}

/// 1-based admission position of a held request among all held requests.
pub fn position(conn: &mut DbConnection, r: &ReservationRow) -> Result<i64, Error> {
    let ahead: i64 = reservations::table
        .filter(reservations::state.eq(ReservationState::Held.as_str()))
        .filter(
            reservations::priority
                .gt(r.priority)
                .or(reservations::priority.eq(r.priority).and(
                    reservations::request_time
                        .lt(r.request_time)
                        .or(reservations::request_time
                            .eq(r.request_time)
                            .and(reservations::allocation_id.lt(&r.allocation_id))),
                )),
        )
        .count()
        .get_result_native(conn)?;
    Ok(ahead + 1)
}

pub fn expired_leases(
    conn: &mut DbConnection,
    now: i64,
    limit: i64,
) -> Result<Vec<ReservationRow>, Error> {
    Ok(gpualloc_storage::native!(conn, |c| reservations::table
        .filter(reservations::state.eq(ReservationState::Granted.as_str()))
        .filter(reservations::expire_time.le(now))
        .order(reservations::expire_time)
        .limit(limit)
        .select(ReservationRow::as_select())
        .load(c))?)
}

pub fn overdue_holds(
    conn: &mut DbConnection,
    now: i64,
    limit: i64,
) -> Result<Vec<ReservationRow>, Error> {
    Ok(gpualloc_storage::native!(conn, |c| reservations::table
        .filter(reservations::state.eq(ReservationState::Held.as_str()))
        .filter(reservations::hold_deadline.le(now))
        .order(reservations::hold_deadline)
        .limit(limit)
        .select(ReservationRow::as_select())
        .load(c))?)
}

/// Earliest lease end or hold deadline still ahead, for the sweeper's timer.
pub fn next_deadline(conn: &mut DbConnection) -> Result<Option<i64>, Error> {
    let lease: Option<i64> = reservations::table
        .filter(reservations::state.eq(ReservationState::Granted.as_str()))
        .select(diesel::dsl::min(reservations::expire_time))
        .get_result_native(conn)?;
    let hold: Option<i64> = reservations::table
        .filter(reservations::state.eq(ReservationState::Held.as_str()))
        .select(diesel::dsl::min(reservations::hold_deadline))
        .get_result_native(conn)?;
    Ok(match (lease, hold) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    })
}

pub fn granted_on_pool(conn: &mut DbConnection, pool: &str) -> Result<i64, Error> {
    Ok(reservations::table
        .filter(reservations::state.eq(ReservationState::Granted.as_str()))
        .filter(reservations::pool_id.eq(pool))
        .count()
        .get_result_native(conn)?)
}

/// Changes a pool's own row (its settings and version).
pub fn update_pool(
    conn: &mut DbConnection,
    id: &str,
    max_hold: Option<i64>,
    now: i64,
) -> Result<(), Error> {
    diesel::update(pools::table.find(id))
        .set((
            pools::max_hold_micros.eq(max_hold),
            pools::version.eq(pools::version + 1),
            pools::update_time.eq(now),
        ))
        .execute_native(conn)?;
    Ok(())
}

/// Makes a pool's capacity rows say `new`, from what they said (`old`):
/// changed classes updated, gone ones deleted, new ones added unused.
pub fn set_pool_capacity(
    conn: &mut DbConnection,
    id: &str,
    old: &BTreeMap<Class, i64>,
    new: &BTreeMap<Class, i64>,
) -> Result<(), Error> {
    for (name, change) in class_changes(old, new) {
        let row = pool_resources::table
            .filter(pool_resources::pool_id.eq(id))
            .filter(pool_resources::class.eq(&name));
        match change {
            ClassChange::Set(cap) => {
                diesel::update(row)
                    .set(pool_resources::capacity.eq(cap))
                    .execute_native(conn)?;
            }
            ClassChange::Removed => {
                diesel::delete(row).execute_native(conn)?;
            }
            ClassChange::Added(cap) => insert_pool_resource(conn, id, &name, cap)?,
        }
    }
    Ok(())
}

/// How one class's row changes when a per-class map (a pool's capacity, a
/// tenant's limits) goes from `old` to `new`.
enum ClassChange {
    Set(i64),
    Removed,
    Added(i64),
}

fn class_changes(
    old: &BTreeMap<Class, i64>,
    new: &BTreeMap<Class, i64>,
) -> Vec<(String, ClassChange)> {
    let classes: BTreeSet<&Class> = old.keys().chain(new.keys()).collect();
    classes
        .into_iter()
        .filter_map(|class| {
            let change = match (old.contains_key(class), new.get(class)) {
                (true, Some(v)) => ClassChange::Set(*v),
                (true, None) => ClassChange::Removed,
                (false, Some(v)) => ClassChange::Added(*v),
                (false, None) => return None,
            };
            Some((class.to_string(), change))
        })
        .collect()
}

pub fn insert_pool(
    conn: &mut DbConnection,
    id: &str,
    max_hold: Option<i64>,
    capacity: &BTreeMap<Class, i64>,
    now: i64,
) -> Result<(), Error> {
    diesel::insert_into(pools::table)
        .values((
            pools::pool_id.eq(id),
            pools::max_hold_micros.eq(max_hold),
            pools::version.eq(1),
            pools::create_time.eq(now),
            pools::update_time.eq(now),
        ))
        .execute_native(conn)?;
    for (class, cap) in capacity {
        insert_pool_resource(conn, id, &class.to_string(), *cap)?;
    }
    Ok(())
}

fn insert_pool_resource(
    conn: &mut DbConnection,
    pool: &str,
    class: &str,
    capacity: i64,
) -> Result<(), Error> {
    diesel::insert_into(pool_resources::table)
        .values((
            pool_resources::pool_id.eq(pool),
            pool_resources::class.eq(class),
            pool_resources::capacity.eq(capacity),
            pool_resources::used.eq(0),
        ))
        .execute_native(conn)?;
    Ok(())
}

/// Deletes a pool and its capacity rows.
pub fn delete_pool(conn: &mut DbConnection, id: &str) -> Result<(), Error> {
    diesel::delete(pool_resources::table.filter(pool_resources::pool_id.eq(id)))
        .execute_native(conn)?;
    diesel::delete(pools::table.find(id)).execute_native(conn)?;
    Ok(())
}

/// Changes a tenant's quota row (approval threshold, hold limit, version).
pub fn update_quota(
    conn: &mut DbConnection,
    tenant: &str,
    approval_above: &str,
    max_hold: Option<i64>,
    version: i64,
    now: i64,
) -> Result<(), Error> {
    diesel::update(tenant_quotas::table.find(tenant))
        .set((
            tenant_quotas::approval_above.eq(approval_above),
            tenant_quotas::max_hold_micros.eq(max_hold),
            tenant_quotas::version.eq(version),
            tenant_quotas::update_time.eq(now),
        ))
        .execute_native(conn)?;
    Ok(())
}

/// Makes a tenant's limit rows say `new`, from what they said (`old`);
/// what the tenant uses is kept.
pub fn set_quota_limits(
    conn: &mut DbConnection,
    tenant: &str,
    old: &BTreeMap<Class, i64>,
    new: &BTreeMap<Class, i64>,
) -> Result<(), Error> {
    for (name, change) in class_changes(old, new) {
        let q = tenant_usage::table
            .filter(tenant_usage::tenant.eq(tenant))
            .filter(tenant_usage::class.eq(&name));
        match change {
            ClassChange::Set(limit) => {
                diesel::update(q)
                    .set(tenant_usage::quota_limit.eq(limit))
                    .execute_native(conn)?;
            }
            ClassChange::Removed => {
                diesel::delete(q).execute_native(conn)?;
            }
            ClassChange::Added(limit) => insert_usage(conn, tenant, &name, limit)?,
        }
    }
    Ok(())
}

pub fn insert_quota(
    conn: &mut DbConnection,
    tenant: &str,
    approval_above: &str,
    max_hold: Option<i64>,
    limits: &BTreeMap<Class, i64>,
    now: i64,
) -> Result<(), Error> {
    diesel::insert_into(tenant_quotas::table)
        .values((
            tenant_quotas::tenant.eq(tenant),
            tenant_quotas::approval_above.eq(approval_above),
            tenant_quotas::max_hold_micros.eq(max_hold),
            tenant_quotas::version.eq(1),
            tenant_quotas::update_time.eq(now),
        ))
        .execute_native(conn)?;
    for (class, limit) in limits {
        insert_usage(conn, tenant, &class.to_string(), *limit)?;
    }
    Ok(())
}

fn insert_usage(
    conn: &mut DbConnection,
    tenant: &str,
    class: &str,
    limit: i64,
) -> Result<(), Error> {
    diesel::insert_into(tenant_usage::table)
        .values((
            tenant_usage::tenant.eq(tenant),
            tenant_usage::class.eq(class),
            tenant_usage::quota_limit.eq(limit),
            tenant_usage::charged.eq(0),
            tenant_usage::granted.eq(0),
        ))
        .execute_native(conn)?;
    Ok(())
}
