//! What administrators do to pools and quotas: put and delete pools, set
//! quotas (whole or by field mask), each under the placement lock and
//! refusing to go below what is in use; raising capacity admits held
//! requests at once. The queries are in [`crate::store`].

use std::collections::{BTreeMap, HashMap};

use gpualloc_domain::{Capacity, Class, PoolId, Resources, TenantId, time};
use gpualloc_proto::{events::v1 as ev, resourcepool::v1 as pb};
use gpualloc_saga::{Emitter, Payload};
use gpualloc_storage::{DbConnection, lock};

use crate::{
    Error, engine,
    mask::{PoolMask, PoolParts, QuotaMask, QuotaParts},
    saga::admit,
    store,
};

/// A pool as an administrator describes it.
#[derive(Clone, Debug)]
pub struct PoolSpec {
    pub id: PoolId,
    pub capacity: Capacity,
    pub max_hold: Option<i64>,
}

/// Creates a pool or replaces its capacity — or, with a mask, the fields
/// it names, merged under the placement lock with what is stored; refuses
/// to go below what is granted. Raising capacity admits held requests at
/// once.
pub fn put_pool(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    spec: &PoolSpec,
    mask: &PoolMask,
) -> Result<store::PoolRecord, Error> {
    lock::acquire(conn, store::PLACEMENT_LOCK)?;
    let now = emit.now();
    let id = spec.id.as_str();
    let existing = store::load_pools(conn)?
        .into_iter()
        .find(|p| p.row.pool_id == id);
    let current = existing.as_ref().map(|p| PoolParts {
        capacity: Capacity::from_lines(p.state.capacity.iter().map(|(c, v)| (c, *v))),
        max_hold: p.row.max_hold_micros,
    });
    let requested = PoolParts {
        capacity: spec.capacity.clone(),
        max_hold: spec.max_hold,
    };
    let Some(merged) = mask.apply(current.as_ref(), requested) else {
        return Err(Error::NotFound {
            kind: "pool",
            id: id.to_owned(),
        });
    };
    let spec = &PoolSpec {
        id: spec.id.clone(),
        capacity: merged.capacity,
        max_hold: merged.max_hold,
    };
    let new: BTreeMap<Class, i64> = spec.capacity.lines().into_iter().collect();
    match &existing {
        Some(p) => {
            let below = above_new(&p.state.used, &new, "granted", "new capacity");
            if !below.is_empty() {
                return Err(Error::Precondition {
                    reason: "CAPACITY_BELOW_USAGE",
                    message: format!(
                        "pool {id} cannot shrink below what is granted on it: {}; cancel allocations first",
                        below.join(", ")
                    ),
                    metadata: HashMap::from([("pool_id".into(), id.into())]),
                });
            }
            store::update_pool(conn, id, spec.max_hold, now)?;
            store::set_pool_capacity(conn, id, &p.state.capacity, &new)?;
        }
        None => store::insert_pool(conn, id, spec.max_hold, &new, now)?,
    }
    let record = store::load_pools(conn)?
        .into_iter()
        .find(|p| p.row.pool_id == id)
        .ok_or_else(|| Error::Invariant(format!("pool {id} vanished")))?;
    emit.emit(
        "",
        "",
        record.row.version,
        Payload::PoolChanged(ev::PoolChanged {
            pool: Some(pool_snapshot(&record)),
            deleted: false,
        }),
    );
    admit(conn, emit)?;
    Ok(record)
}

/// Deletes an idle pool. Held requests that only it could hold are rejected.
pub fn delete_pool(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    id: &PoolId,
) -> Result<store::PoolRecord, Error> {
    lock::acquire(conn, store::PLACEMENT_LOCK)?;
    let record = store::load_pools(conn)?
        .into_iter()
        .find(|p| p.row.pool_id == id.as_str())
        .ok_or_else(|| Error::NotFound {
            kind: "pool",
            id: id.to_string(),
        })?;
    let granted = store::granted_on_pool(conn, id.as_str())?;
    if granted > 0 || record.state.used.values().any(|u| *u > 0) {
        return Err(Error::Precondition {
            reason: "POOL_IN_USE",
            message: format!(
                "pool {id} still has {granted} granted reservation(s); cancel them first"
            ),
            metadata: HashMap::from([
                ("pool_id".into(), id.to_string()),
                ("granted".into(), granted.to_string()),
            ]),
        });
    }
    store::delete_pool(conn, id.as_str())?;
    emit.emit(
        "",
        "",
        record.row.version + 1,
        Payload::PoolChanged(ev::PoolChanged {
            pool: Some(pool_snapshot(&record)),
            deleted: true,
        }),
    );
    admit(conn, emit)?;
    Ok(record)
}

/// A tenant's quota as an administrator sets it.
#[derive(Clone, Debug)]
pub struct QuotaSpec {
    pub tenant: TenantId,
    pub limits: Resources,
    pub approval_above: Resources,
    pub max_hold: Option<i64>,
}

/// Sets a tenant's quota — or, with a mask, the fields it names, merged
/// under the placement lock with what is stored; refuses limits below what
/// the tenant holds.
pub fn set_quota(
    conn: &mut DbConnection,
    emit: &mut Emitter,
    spec: &QuotaSpec,
    mask: &QuotaMask,
) -> Result<(), Error> {
    lock::acquire(conn, store::PLACEMENT_LOCK)?;
    let now = emit.now();
    let tenant = spec.tenant.as_str();
    let existing = store::load_tenant(conn, tenant)?;
    let current = existing.as_ref().map(|(row, state)| QuotaParts {
        limits: Resources::from_lines(state.limits.iter().map(|(c, v)| (c, *v))),
        approval_above: state.approval_above.clone(),
        max_hold: row.max_hold_micros,
    });
    let requested = QuotaParts {
        limits: spec.limits.clone(),
        approval_above: spec.approval_above.clone(),
        max_hold: spec.max_hold,
    };
    let Some(merged) = mask.apply(current.as_ref(), requested) else {
        return Err(Error::NotFound {
            kind: "tenant quota",
            id: tenant.to_owned(),
        });
    };
    let spec = &QuotaSpec {
        tenant: spec.tenant.clone(),
        limits: merged.limits,
        approval_above: merged.approval_above,
        max_hold: merged.max_hold,
    };
    let new: BTreeMap<Class, i64> = spec.limits.quota_lines().into_iter().collect();
    let approval = serde_json::to_string(&spec.approval_above)
        .map_err(|e| Error::Invariant(format!("encoding approval_above: {e}")))?;
    let version = match &existing {
        Some((row, state)) => {
            let below = above_new(&state.charged, &new, "in use", "new limit");
            if !below.is_empty() {
                return Err(Error::Precondition {
                    reason: "QUOTA_BELOW_USAGE",
                    message: format!(
                        "tenant {tenant} already uses more than the new limits allow: {}",
                        below.join(", ")
                    ),
                    metadata: HashMap::from([("tenant".into(), tenant.into())]),
                });
            }
            store::update_quota(conn, tenant, &approval, spec.max_hold, row.version + 1, now)?;
            store::set_quota_limits(conn, tenant, &state.limits, &new)?;
            row.version + 1
        }
        None => {
            store::insert_quota(conn, tenant, &approval, spec.max_hold, &new, now)?;
            1
        }
    };
    emit.emit(
        "",
        tenant,
        version,
        Payload::TenantQuotaChanged(ev::TenantQuotaChanged {
            limits: Some(ev::Resources::from(&spec.limits)),
            approval_above: Some(ev::Resources::from(&spec.approval_above)),
        }),
    );
    Ok(())
}

pub fn pool_to_proto(p: &store::PoolRecord) -> pb::Pool {
    let capacity = Capacity::from_lines(p.state.capacity.iter().map(|(c, v)| (c, *v)));
    let usage = Capacity::from_lines(p.state.used.iter().map(|(c, v)| (c, *v)));
    pb::Pool {
        pool_id: p.row.pool_id.clone(),
        capacity: Some(pb::Capacity::from(&capacity)),
        usage: Some(pb::Capacity::from(&usage)),
        free: Some(free_of(&p.state)),
        max_hold: p.row.max_hold_micros.map(time::to_duration),
        version: p.row.version,
        create_time: Some(time::to_timestamp(p.row.create_time)),
        update_time: Some(time::to_timestamp(p.row.update_time)),
    }
}

/// The classes in which `used` exceeds the `new` per-class amounts (a
/// class `new` leaves out has 0), described for the refusal.
fn above_new(
    used: &BTreeMap<Class, i64>,
    new: &BTreeMap<Class, i64>,
    used_as: &str,
    new_as: &str,
) -> Vec<String> {
    used.iter()
        .filter_map(|(c, used)| {
            let limit = new.get(c).copied().unwrap_or(0);
            (*used > limit).then(|| format!("{c} ({used_as} {used}, {new_as} {limit})"))
        })
        .collect()
}

/// The pool as `PoolChanged` carries it: the events' own message, built
/// field by field so that an API change does not change the event.
fn pool_snapshot(p: &store::PoolRecord) -> ev::PoolSnapshot {
    let capacity = Capacity::from_lines(p.state.capacity.iter().map(|(c, v)| (c, *v)));
    let usage = Capacity::from_lines(p.state.used.iter().map(|(c, v)| (c, *v)));
    let free = free_of(&p.state);
    ev::PoolSnapshot {
        pool_id: p.row.pool_id.clone(),
        capacity: Some(ev::Capacity::from(&capacity)),
        usage: Some(ev::Capacity::from(&usage)),
        free: Some(ev::Capacity {
            cpu_millis: free.cpu_millis,
            memory_mib: free.memory_mib,
            storage_gib: free.storage_gib,
            gpus_by_model: free.gpus_by_model,
            custom: free.custom,
        }),
        max_hold: p.row.max_hold_micros.map(time::to_duration),
        version: p.row.version,
        create_time: Some(time::to_timestamp(p.row.create_time)),
        update_time: Some(time::to_timestamp(p.row.update_time)),
    }
}

/// Capacity minus usage for every class the pool has — a GPU model or
/// custom class that is fully used shows 0 rather than disappearing.
fn free_of(state: &engine::PoolState) -> pb::Capacity {
    let lines: Vec<(Class, i64)> = state
        .capacity
        .keys()
        .map(|c| (c.clone(), state.free(c).max(0)))
        .collect();
    let mut free = pb::Capacity::from(&Capacity::from_lines(lines.iter().map(|(c, v)| (c, *v))));
    for class in state.capacity.keys() {
        match class {
            Class::GpusOf(model) => {
                free.gpus_by_model.entry(model.to_string()).or_insert(0);
            }
            Class::Custom(name) => {
                free.custom.entry(name.to_string()).or_insert(0);
            }
            _ => {}
        }
    }
    free
}
