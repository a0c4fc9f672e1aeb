//! The viewer's read queries: allocation views (get, keyset-paged lists,
//! hold positions made current at read time), history, tenant summaries,
//! the watch snapshot and the changes a resuming watcher missed, and the
//! rows usage reports are computed from.

use base64::Engine;
use diesel::prelude::*;
use gpualloc_domain::{Resources, State, TenantId, time};
use gpualloc_proto::{events::v1 as ev, viewer::v1 as pb};
use gpualloc_storage::{DbConnection, LiteralLimitExt, Native};
use prost::Message;

use crate::{
    Error,
    schema::{allocation_history, allocation_views, tenant_quota_views},
};

#[derive(Clone, Debug, Queryable, Selectable)]
#[diesel(table_name = allocation_views)]
pub struct ViewRow {
    pub allocation_id: String,
    pub tenant: String,
    pub state: String,
    pub version: i64,
    pub create_time: i64,
    pub update_time: i64,
    pub hold_position: i64,
    pub snapshot: Vec<u8>,
    pub project_time: i64,
}

impl ViewRow {
    pub fn to_proto(&self) -> Result<pb::AllocationView, Error> {
        let allocation = ev::AllocationSnapshot::decode(self.snapshot.as_slice())
            .map(crate::wire::allocation)
            .map_err(|e| {
                Error::BadEvent(format!("stored snapshot of {}: {e}", self.allocation_id))
            })?;
        Ok(pb::AllocationView {
            hold_position: if self.state == State::Held.as_str() {
                self.hold_position
            } else {
                0
            },
            allocation: Some(allocation),
            project_time: Some(time::to_timestamp(self.project_time)),
        })
    }
}

/// The current 1-based position of every HELD allocation the viewer knows,
/// in the pool's admission order (priority, then request time, then id),
/// so that a view shows where it stands now, not where it was queued.
pub fn hold_positions(
    conn: &mut DbConnection,
) -> Result<std::collections::HashMap<String, i64>, Error> {
    let rows: Vec<(String, i64, Vec<u8>)> = allocation_views::table
        .filter(allocation_views::state.eq(State::Held.as_str()))
        .select((
            allocation_views::allocation_id,
            allocation_views::create_time,
            allocation_views::snapshot,
        ))
        .load_native(conn)?;
    let mut queue: Vec<(i32, i64, String)> = rows
        .into_iter()
        .map(|(id, created, snapshot)| {
            let priority = ev::AllocationSnapshot::decode(snapshot.as_slice())
                .map(|a| a.priority)
                .unwrap_or(0);
            (priority, created, id)
        })
        .collect();
    queue.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then_with(|| a.2.cmp(&b.2))
    });
    Ok(queue
        .into_iter()
        .enumerate()
        .map(|(i, (_, _, id))| (id, i as i64 + 1))
        .collect())
}

/// `view` with its hold position made current, when it is HELD.
pub fn with_position(
    mut view: pb::AllocationView,
    positions: &std::collections::HashMap<String, i64>,
) -> pb::AllocationView {
    if view.hold_position > 0
        && let Some(id) = view.allocation.as_ref().map(|a| &a.allocation_id)
        && let Some(p) = positions.get(id)
    {
        view.hold_position = *p;
    }
    view
}

pub fn get(conn: &mut DbConnection, id: &str) -> Result<Option<ViewRow>, Error> {
    Ok(gpualloc_storage::native!(conn, |c| allocation_views::table
        .find(id)
        .select(ViewRow::as_select())
        .get_result(c))
    .optional()?)
}

/// Position in a newest-first listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cursor {
    pub create_time: i64,
    pub allocation_id: String,
}

impl Cursor {
    pub fn encode(&self) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(format!("v1:{}:{}", self.create_time, self.allocation_id))
    }

    pub fn decode(token: &str) -> Option<Cursor> {
        let raw = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(token)
            .ok()?;
        let raw = String::from_utf8(raw).ok()?;
        let rest = raw.strip_prefix("v1:")?;
        let (t, id) = rest.split_once(':')?;
        Some(Cursor {
            create_time: t.parse().ok()?,
            allocation_id: id.to_owned(),
        })
    }
}

/// One page, newest first, strictly after `after` (keyset pagination: stable
/// while new allocations arrive, since they sort before the cursor).
pub fn list(
    conn: &mut DbConnection,
    tenant: Option<&TenantId>,
    states: &[State],
    after: Option<&Cursor>,
    limit: i64,
) -> Result<Vec<ViewRow>, Error> {
    let mut q = allocation_views::table
        .select(ViewRow::as_select())
        .into_boxed();
    if let Some(t) = tenant {
        q = q.filter(allocation_views::tenant.eq(t.as_str().to_owned()));
    }
    if !states.is_empty() {
        let names: Vec<&str> = states.iter().map(|s| s.as_str()).collect();
        q = q.filter(allocation_views::state.eq_any(names));
    }
    if let Some(c) = after {
        q = q.filter(
            allocation_views::create_time
                .lt(c.create_time)
                .or(allocation_views::create_time
                    .eq(c.create_time)
                    .and(allocation_views::allocation_id.lt(c.allocation_id.clone()))),
        );
    }
    Ok(q.order((
        allocation_views::create_time.desc(),
        allocation_views::allocation_id.desc(),
    ))
    .limit(limit)
    .load(conn)?)
}

/// A parsed `label_selector`: every `key=value` must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Selector(pub Vec<(String, String)>);

impl Selector {
    /// At most this many pairs.
    pub const MAX_PAIRS: usize = 32;

    pub fn parse(text: &str) -> Result<Selector, String> {
        let mut pairs = Vec::new();
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let Some((k, v)) = part.split_once('=') else {
                return Err(format!("{} is not key=value", gpualloc_domain::shown(part)));
            };
            if k.trim().is_empty() {
                return Err(format!("{} has no key", gpualloc_domain::shown(part)));
            }
            pairs.push((k.trim().to_owned(), v.trim().to_owned()));
        }
        if pairs.len() > Self::MAX_PAIRS {
            return Err(format!("at most {} key=value pairs", Self::MAX_PAIRS));
        }
        Ok(Selector(pairs))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn matches(&self, labels: &std::collections::BTreeMap<String, String>) -> bool {
        self.0.iter().all(|(k, v)| labels.get(k) == Some(v))
    }
}

/// The labels of a stored view (from its snapshot).
pub fn labels_of(row: &ViewRow) -> std::collections::BTreeMap<String, String> {
    ev::AllocationSnapshot::decode(row.snapshot.as_slice())
        .map(|a| a.labels)
        .unwrap_or_default()
}

pub fn history(conn: &mut DbConnection, id: &str) -> Result<Vec<pb::HistoryEntry>, Error> {
    type Entry = (i64, String, String, String, String, i64, String);
    let rows: Vec<Entry> = allocation_history::table
        .filter(allocation_history::allocation_id.eq(id))
        .order(allocation_history::version)
        .select((
            allocation_history::version,
            allocation_history::event_id,
            allocation_history::previous_state,
            allocation_history::state,
            allocation_history::reason,
            allocation_history::change_time,
            allocation_history::actor,
        ))
        .load_native(conn)?;
    Ok(rows
        .into_iter()
        .map(
            |(version, event_id, previous, state, reason, t, actor)| pb::HistoryEntry {
                event_id,
                version,
                previous_state: State::parse(&previous)
                    .map(|s| s.to_proto() as i32)
                    .unwrap_or(0),
                state: State::parse(&state)
                    .map(|s| s.to_proto() as i32)
                    .unwrap_or(0),
                reason,
                change_time: Some(time::to_timestamp(t)),
                actor,
            },
        )
        .collect())
}

pub fn tenant_of_history(conn: &mut DbConnection, id: &str) -> Result<Option<String>, Error> {
    Ok(allocation_history::table
        .filter(allocation_history::allocation_id.eq(id))
        .select(allocation_history::tenant)
        .first(conn)
        .optional()?)
}

pub fn summary(conn: &mut DbConnection, tenant: &TenantId) -> Result<pb::TenantSummary, Error> {
    let counts: Vec<(String, i64)> = allocation_views::table
        .filter(allocation_views::tenant.eq(tenant.as_str()))
        .group_by(allocation_views::state)
        .select((allocation_views::state, diesel::dsl::count_star()))
        .load_native(conn)?;
    let mut counts: Vec<pb::StateCount> = counts
        .into_iter()
        .filter_map(|(s, n)| {
            State::parse(&s).map(|s| pb::StateCount {
                state: s.to_proto() as i32,
                count: n,
            })
        })
        .collect();
    counts.sort_by_key(|c| c.state);
    let allocated: Vec<Vec<u8>> = allocation_views::table
        .filter(allocation_views::tenant.eq(tenant.as_str()))
        .filter(allocation_views::state.eq(State::Allocated.as_str()))
        .select(allocation_views::snapshot)
        .load_native(conn)?;
    let mut in_use = Resources::default();
    for snapshot in allocated {
        let a = ev::AllocationSnapshot::decode(snapshot.as_slice())
            .map_err(|e| Error::BadEvent(e.to_string()))?;
        let r = Resources::try_from(a.resources.unwrap_or_default())
            .map_err(|e| Error::BadEvent(e.to_string()))?;
        // Saturating: the snapshots come from events, and a sum of
        // forged amounts must not overflow inside a read.
        in_use = in_use.saturating_add(&r);
    }
    let quota: Option<String> = tenant_quota_views::table
        .find(tenant.as_str())
        .select(tenant_quota_views::limits)
        .get_result_native(conn)
        .optional()?;
    let quota = quota
        .map(|q| serde_json::from_str::<Resources>(&q))
        .transpose()
        .map_err(|e| Error::BadEvent(e.to_string()))?;
    Ok(pb::TenantSummary {
        tenant: tenant.to_string(),
        counts,
        in_use: Some((&in_use).into()),
        quota: quota.as_ref().map(Into::into),
    })
}

#[cfg(test)]
mod tests {
    use super::Cursor;

    #[test]
    fn cursors_round_trip_and_reject_garbage() {
        let c = Cursor {
            create_time: 1_700_000_000_000_000,
            allocation_id: "0190-abc".into(),
        };
        assert_eq!(Cursor::decode(&c.encode()), Some(c));
        assert_eq!(Cursor::decode("not a token"), None);
        assert_eq!(Cursor::decode(""), None);
    }
}

/// One version of an allocation, as projected.
#[derive(Clone, Debug, Queryable, Selectable)]
#[diesel(table_name = allocation_history)]
pub struct HistoryRow {
    pub allocation_id: String,
    pub version: i64,
    pub tenant: String,
    pub state: String,
    pub change_time: i64,
    pub snapshot: Vec<u8>,
    pub project_time: i64,
}

/// One page of the current views a watcher starts from, in
/// `(create_time, allocation_id)` order after `after`: a tenant with a
/// hundred thousand allocations is sent page by page, never held whole.
pub fn watch_snapshot(
    conn: &mut DbConnection,
    tenant: Option<&str>,
    allocation_id: Option<&str>,
    after: Option<&(i64, String)>,
    limit: i64,
) -> Result<Vec<ViewRow>, Error> {
    let mut q = allocation_views::table
        .select(ViewRow::as_select())
        .into_boxed();
    if let Some(t) = tenant {
        q = q.filter(allocation_views::tenant.eq(t.to_owned()));
    }
    if let Some(id) = allocation_id {
        q = q.filter(allocation_views::allocation_id.eq(id.to_owned()));
    }
    if let Some((time, id)) = after {
        q = q.filter(
            allocation_views::create_time
                .gt(*time)
                .or(allocation_views::create_time
                    .eq(*time)
                    .and(allocation_views::allocation_id.gt(id.clone()))),
        );
    }
    Ok(q.order((
        allocation_views::create_time,
        allocation_views::allocation_id,
    ))
    .limit(limit)
    .load(conn)?)
}

/// The watchers' window: rows of `allocation_history` projected at or after
/// `$since`, in projection order, selecting `$select`. A macro so that the
/// query is built per backend inside `native!` (its type depends on it).
macro_rules! watch_window {
    ($c:ident, $select:expr, $tenant:expr, $allocation_id:expr, $since:expr, $limit:expr) => {{
        let mut q = allocation_history::table
            .filter(allocation_history::project_time.ge($since))
            .select($select)
            .into_boxed();
        if let Some(t) = $tenant {
            q = q.filter(allocation_history::tenant.eq(t.to_owned()));
        }
        if let Some(id) = $allocation_id {
            q = q.filter(allocation_history::allocation_id.eq(id.to_owned()));
        }
        q.order((
            allocation_history::project_time,
            allocation_history::allocation_id,
            allocation_history::version,
        ))
        .limit_literal($limit)
        .load($c)
    }};
}

/// History rows projected at or after `since`, in projection order.
pub fn changes_since(
    conn: &mut DbConnection,
    tenant: Option<&str>,
    allocation_id: Option<&str>,
    since: i64,
    limit: i64,
) -> Result<Vec<HistoryRow>, Error> {
    let limit = u32::try_from(limit).unwrap_or(u32::MAX);
    Ok(gpualloc_storage::native!(conn, |c| watch_window!(
        c,
        HistoryRow::as_select(),
        tenant,
        allocation_id,
        since,
        limit
    ))?)
}

/// The versions of `id` after `after` up to `upto`, in order: what a
/// reconnecting watcher missed.
pub fn history_after(
    conn: &mut DbConnection,
    id: &str,
    after: i64,
    upto: i64,
) -> Result<Vec<HistoryRow>, Error> {
    Ok(gpualloc_storage::native!(conn, |c| {
        allocation_history::table
            .filter(allocation_history::allocation_id.eq(id))
            .filter(allocation_history::version.gt(after))
            .filter(allocation_history::version.le(upto))
            .order(allocation_history::version)
            .select(HistoryRow::as_select())
            .load(c)
    })?)
}

/// Which versions [`changes_since`] would return, and when each was
/// projected: `(allocation_id, version, project_time)`, read from the
/// covering index alone.
pub fn change_keys_since(
    conn: &mut DbConnection,
    tenant: Option<&str>,
    allocation_id: Option<&str>,
    since: i64,
    limit: i64,
) -> Result<Vec<(String, i64, i64)>, Error> {
    let limit = u32::try_from(limit).unwrap_or(u32::MAX);
    let keys = (
        allocation_history::allocation_id,
        allocation_history::version,
        allocation_history::project_time,
    );
    Ok(gpualloc_storage::native!(conn, |c| watch_window!(
        c,
        keys,
        tenant,
        allocation_id,
        since,
        limit
    ))?)
}

/// A tenant's history rows that can matter for `[from, to)`: every version
/// before `to` of each allocation that changed on or after `from` or is
/// allocated now — the others ended before the month began. Old finished
/// allocations, the bulk of a long history, are never read.
/// Tenants with something to bill in `[from, to)`: a change before `to`
/// since `from`, or an allocation running now.
pub fn usage_tenants(
    conn: &mut DbConnection,
    (from, to): (i64, i64),
) -> Result<Vec<String>, Error> {
    let mut tenants: Vec<String> = allocation_history::table
        .filter(allocation_history::change_time.ge(from))
        .filter(allocation_history::change_time.lt(to))
        .select(allocation_history::tenant)
        .distinct()
        .load_native(conn)?;
    tenants.extend(
        allocation_views::table
            .filter(allocation_views::state.eq(State::Allocated.as_str()))
            .select(allocation_views::tenant)
            .distinct()
            .load_native::<String>(conn)?,
    );
    tenants.sort();
    tenants.dedup();
    Ok(tenants)
}

pub fn usage_history(
    conn: &mut DbConnection,
    tenant: &str,
    (from, to): (i64, i64),
) -> Result<Vec<HistoryRow>, Error> {
    let mut ids: Vec<String> = allocation_history::table
        .filter(allocation_history::tenant.eq(tenant))
        .filter(allocation_history::change_time.ge(from))
        .select(allocation_history::allocation_id)
        .distinct()
        .load_native(conn)?;
    ids.extend(
        allocation_views::table
            .filter(allocation_views::tenant.eq(tenant))
            .filter(allocation_views::state.eq(State::Allocated.as_str()))
            .select(allocation_views::allocation_id)
            .load_native::<String>(conn)?,
    );
    ids.sort();
    ids.dedup();
    let mut rows = Vec::new();
    // Bounded lists of bind parameters (SQLite allows 32,766 per query).
    for chunk in ids.chunks(5_000) {
        rows.extend(gpualloc_storage::native!(conn, |c| {
            allocation_history::table
                .filter(allocation_history::allocation_id.eq_any(chunk))
                .filter(allocation_history::change_time.lt(to))
                .select(HistoryRow::as_select())
                .order((
                    allocation_history::allocation_id,
                    allocation_history::version,
                ))
                .load::<HistoryRow>(c)
        })?);
    }
    Ok(rows)
}
