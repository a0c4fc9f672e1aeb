//! What `CheckQuota` decides on: the pools and the tenant's counters,
//! kept in memory so that the synchronous check on every create's path does
//! not cost a database read (a blocking-pool hop, a connection and two
//! queries: half of the check's throughput in the benchmark).
//!
//! `CheckQuota` is advisory — the saga's placement re-checks in the write
//! transaction — but a tenant must still see its own writes at once: an
//! allocation granted or a quota changed through this process makes the next
//! check here answer from the new counters. So an entry is only served while
//! no local write has ended since it was read ([`Db::write_generation`]), and
//! a read that raced a write is not stored. Writes by other replicas become
//! visible within the TTL.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use gpualloc_storage::Db;

use crate::{
    Error,
    engine::{PoolState, TenantState},
    store,
};

/// Tenants remembered at most; past it, entries older than the TTL go.
const MAX_TENANTS: usize = 10_000;

/// One consistent view for one decision.
#[derive(Clone, Debug)]
pub struct Snapshot {
    pub pools: Arc<Vec<PoolState>>,
    pub tenant: Option<Arc<TenantState>>,
}

#[derive(Debug)]
pub struct QuotaCache {
    ttl: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The write generation every entry below was read at.
    generation: u64,
    pools: Option<(Instant, Arc<Vec<PoolState>>)>,
    tenants: HashMap<String, (Instant, Option<Arc<TenantState>>)>,
}

impl QuotaCache {
    /// A zero `ttl` turns the cache off: every check reads the database.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            inner: Mutex::default(),
        }
    }

    /// The pools and `tenant`'s counters as of a moment no longer ago than
    /// the TTL and no older than this process's last write.
    pub async fn snapshot(&self, db: &Db, tenant: &str) -> Result<Snapshot, Error> {
        let generation = db.write_generation();
        if let Some(s) = self.lookup(generation, tenant) {
            return Ok(s);
        }
        let t = tenant.to_owned();
        let (pools, state) = db
            .read_short(move |conn| {
                let pools = store::pool_states(conn)?;
                let state = store::load_tenant(conn, &t)?.map(|(_, s)| s);
                Ok::<_, Error>((pools, state))
            })
            .await?;
        let snapshot = Snapshot {
            pools: Arc::new(pools),
            tenant: state.map(Arc::new),
        };
        // Read before the query and unchanged after it: no local write
        // ended in between, so what was read is at least that fresh.
        if self.ttl > Duration::ZERO && db.write_generation() == generation {
            self.store(generation, tenant, &snapshot);
        }
        Ok(snapshot)
    }

    fn lookup(&self, generation: u64, tenant: &str) -> Option<Snapshot> {
        let inner = self.inner.lock().ok()?;
        if inner.generation != generation {
            return None;
        }
        let fresh = |at: &Instant| at.elapsed() < self.ttl;
        let (at, pools) = inner.pools.as_ref()?;
        let (tat, state) = inner.tenants.get(tenant)?;
        (fresh(at) && fresh(tat)).then(|| Snapshot {
            pools: pools.clone(),
            tenant: state.clone(),
        })
    }

    fn store(&self, generation: u64, tenant: &str, s: &Snapshot) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        if generation < inner.generation {
            return;
        }
        if generation > inner.generation {
            *inner = Inner {
                generation,
                ..Default::default()
            };
        }
        let now = Instant::now();
        if inner.tenants.len() >= MAX_TENANTS {
            let ttl = self.ttl;
            inner.tenants.retain(|_, (at, _)| at.elapsed() < ttl);
            if inner.tenants.len() >= MAX_TENANTS {
                inner.tenants.clear();
            }
        }
        inner.pools = Some((now, s.pools.clone()));
        inner
            .tenants
            .insert(tenant.to_owned(), (now, s.tenant.clone()));
    }
}
