//! `WatchAllocations`: a snapshot of the current views, then every change
//! once, in version order per allocation.
//!
//! Watchers follow the history table, not the event stream: every replica
//! of the viewer projects into the same database, so a watcher on one
//! replica sees what another projected, and the snapshot and the live part
//! come from one source with no gap between them. Each watcher polls on its
//! own task — woken at once when this replica commits, and every
//! [`POLL`] otherwise — so a slow watcher never holds up the projection
//! or other watchers. Its buffer is bounded; a watcher that falls
//! [`BUFFER`] messages behind is ended with `RESOURCE_EXHAUSTED`.
//!
//! A reconnecting client names the last version it received of each
//! allocation (`resume_versions`): those are not in its snapshot, and
//! what it missed follows the snapshot as changes from the history, so a
//! watcher that moves to another replica sees every version once.
//!
//! Exactly once and in order: the watcher remembers the last version sent
//! per allocation, skips what it has sent and holds back a version until
//! the one before it has been sent. Rows are read again from a little
//! before the previous poll ([`LAG`]), because a transaction that started
//! earlier may commit after a later one. A poll reads only the keys of its
//! window (from a covering index) and whole rows, with their snapshots,
//! from the oldest version not sent yet: re-reading the overlap with the
//! snapshots was a third of a busy viewer's CPU.

use std::{
    collections::{BTreeMap, HashMap},
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::time::Instant;

use gpualloc_domain::time;
use gpualloc_proto::{events::v1 as ev, viewer::v1 as pb};
use gpualloc_storage::Db;
use prost::Message;
use tokio::sync::{Notify, mpsc};
use tokio_stream::{Stream, StreamExt, wrappers::ReceiverStream};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::{Error, store};

/// Default of the messages a watcher may have unread before it is ended.
pub const BUFFER: usize = 1024;
/// Default caps on open watch streams, in all and per tenant.
pub const MAX_WATCHERS: usize = 10_000;
pub const MAX_WATCHERS_PER_TENANT: usize = 100;
/// Views read per snapshot page.
const SNAPSHOT_PAGE: i64 = 500;

/// Open watch streams, globally and per tenant: each holds a task and a
/// buffer, so their number is bounded (`RESOURCE_EXHAUSTED` past it).
#[derive(Debug)]
pub struct Limits {
    global: usize,
    per_tenant: usize,
    open: std::sync::Mutex<(usize, HashMap<String, usize>)>,
}

/// One open watch stream; closing it (dropping this) frees its place.
#[derive(Debug)]
pub struct Slot {
    limits: Arc<Limits>,
    key: String,
}

impl Limits {
    pub fn new(global: usize, per_tenant: usize) -> Arc<Limits> {
        Arc::new(Limits {
            global: global.max(1),
            per_tenant: per_tenant.max(1),
            open: std::sync::Mutex::new((0, HashMap::new())),
        })
    }

    /// A place for a watcher of `key` (the tenant, or `*` for an
    /// administrator's watch of every tenant).
    pub fn acquire(self: &Arc<Self>, key: &str) -> Result<Slot, Status> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let of_key = open.1.get(key).copied().unwrap_or(0);
        if open.0 >= self.global {
            return Err(gpualloc_platform::layers::shed::exhausted(
                format!(
                    "this viewer serves {} watch streams, its limit; retry later or on another replica",
                    self.global
                ),
                1000,
            ));
        }
        if of_key >= self.per_tenant {
            return Err(gpualloc_platform::layers::shed::exhausted(
                format!(
                    "{key:?} has {of_key} open watch streams, the limit per tenant; close one first"
                ),
                1000,
            ));
        }
        open.0 += 1;
        *open.1.entry(key.to_owned()).or_default() += 1;
        Ok(Slot {
            limits: self.clone(),
            key: key.to_owned(),
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut open = self.limits.open.lock().unwrap_or_else(|p| p.into_inner());
        open.0 = open.0.saturating_sub(1);
        if let Some(n) = open.1.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.1.remove(&self.key);
            }
        }
    }
}
/// Longest wait between two polls (changes projected by other replicas).
pub const POLL: Duration = Duration::from_millis(100);
/// How far back a catch-up poll reads again, for transactions that commit
/// late (on PostgreSQL a transaction stamped earlier can commit after one
/// stamped later, by another replica or under contention).
pub const LAG: i64 = 5_000_000;
/// How often a poll is a catch-up poll. The others read only from shortly
/// before the previous poll: re-reading the whole `LAG` window on every
/// poll cost a busy viewer half its CPU (O(rate × LAG) rows per poll) for
/// rows that were, nearly always, sent already.
const CATCH_UP: Duration = Duration::from_secs(1);
/// How far before the previous poll an ordinary poll starts reading.
const OVERLAP: i64 = 200_000;
/// Rows read per poll.
const BATCH: i64 = 2_000;

/// What to watch.
#[derive(Clone, Debug)]
pub struct Filter {
    /// `None`: every tenant (administrators only).
    pub tenant: Option<String>,
    pub allocation_id: Option<String>,
    /// A reconnecting client's last version per allocation.
    pub resume: HashMap<String, i64>,
}

/// Most entries a resume point may have.
pub const MAX_RESUME: usize = 10_000;

/// Wakes watchers when this replica has projected something: the
/// watchers of the tenants it changed, and those watching every tenant.
/// A watcher of another tenant sleeps on (until its next [`POLL`]): with a
/// thousand watchers open, waking all of them on every commit had each of
/// them read the history for nothing (see docs/benchmarks.md).
#[derive(Clone, Debug, Default)]
pub struct Changes(Arc<Wakers>);

#[derive(Debug, Default)]
struct Wakers {
    /// Watchers of every tenant (administrators).
    every: Arc<Notify>,
    /// Per tenant watched so far. Entries stay: one per tenant, small.
    tenants: std::sync::Mutex<HashMap<String, Arc<Notify>>>,
}

impl Changes {
    /// Something was projected for `tenants`; `None` is a change of no
    /// tenant in particular, which wakes every watcher.
    pub fn notify<'a>(&self, tenants: impl IntoIterator<Item = Option<&'a str>>) {
        let map = self
            .0
            .tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut everyone = false;
        let mut woken = std::collections::HashSet::new();
        for tenant in tenants {
            match tenant {
                Some(t) => {
                    if woken.insert(t)
                        && let Some(n) = map.get(t)
                    {
                        n.notify_waiters();
                    }
                }
                None => everyone = true,
            }
        }
        if everyone {
            map.values().for_each(|n| n.notify_waiters());
        }
        self.0.every.notify_waiters();
    }

    /// What a watcher of `tenant` (`None`: every tenant) waits on.
    fn waker(&self, tenant: Option<&str>) -> Arc<Notify> {
        let Some(tenant) = tenant else {
            return self.0.every.clone();
        };
        self.0
            .tenants
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(tenant.to_owned())
            .or_default()
            .clone()
    }
}

pub type WatchStream =
    Pin<Box<dyn Stream<Item = Result<pb::WatchAllocationsResponse, Status>> + Send>>;

/// Starts a watcher and returns its stream. `slot` is held until the
/// watcher ends.
pub fn start(
    db: Db,
    filter: Filter,
    changes: Changes,
    stopping: CancellationToken,
    buffer: usize,
    slot: Slot,
) -> WatchStream {
    let (tx, rx) = mpsc::channel(buffer);
    let overflow = Arc::new(AtomicBool::new(false));
    let flag = overflow.clone();
    tokio::spawn(async move {
        let _slot = slot;
        if let Err(status) = follow(&db, &filter, &changes, &stopping, &tx, &flag).await {
            let _ = tx.try_send(Err(status));
        }
    });
    // After the buffered messages, a watcher that overflowed learns why.
    let tail = tokio_stream::iter([()]).filter_map(move |_| {
        overflow.load(Ordering::SeqCst).then(|| {
            Err(Status::resource_exhausted(format!(
                "the watcher fell more than {buffer} changes behind; reconnect to get a fresh snapshot"
            )))
        })
    });
    Box::pin(ReceiverStream::new(rx).chain(tail))
}

enum Sent {
    Ok,
    /// The client is gone or too slow: stop.
    Stop,
}

fn send(
    tx: &mpsc::Sender<Result<pb::WatchAllocationsResponse, Status>>,
    overflow: &AtomicBool,
    message: pb::WatchAllocationsResponse,
) -> Sent {
    match tx.try_send(Ok(message)) {
        Ok(()) => Sent::Ok,
        Err(mpsc::error::TrySendError::Full(_)) => {
            overflow.store(true, Ordering::SeqCst);
            Sent::Stop
        }
        Err(mpsc::error::TrySendError::Closed(_)) => Sent::Stop,
    }
}

fn change(view: pb::AllocationView) -> pb::WatchAllocationsResponse {
    pb::WatchAllocationsResponse {
        r#type: pb::WatchEventType::Change as i32,
        view: Some(view),
    }
}

async fn follow(
    db: &Db,
    filter: &Filter,
    changes: &Changes,
    stopping: &CancellationToken,
    tx: &mpsc::Sender<Result<pb::WatchAllocationsResponse, Status>>,
    overflow: &AtomicBool,
) -> Result<(), Status> {
    let start = time::now_micros();
    // Per allocation, the version sent last, and whether that ended it.
    let mut last: HashMap<String, LastSent> = HashMap::new();
    // The snapshot goes out page by page at the client's pace (a send
    // waits for room): it is as large as the tenant's allocations, which
    // the buffer is not. Changes meanwhile are picked up after it, from
    // `start` on, and what a page already showed is not sent again.
    let mut after: Option<(i64, String)> = None;
    // Resumed allocations that changed meanwhile: (id, seen, current).
    let mut catch_up: Vec<(String, i64, i64)> = Vec::new();
    loop {
        let f = filter.clone();
        let cursor = after.clone();
        let page = db
            .read_short(move |c| {
                store::watch_snapshot(
                    c,
                    f.tenant.as_deref(),
                    f.allocation_id.as_deref(),
                    cursor.as_ref(),
                    SNAPSHOT_PAGE,
                )
            })
            .await
            .map_err(Status::from)?;
        let full = page.len() as i64 == SNAPSHOT_PAGE;
        for row in &page {
            let resumed = filter.resume.get(&row.allocation_id).copied();
            last.insert(
                row.allocation_id.clone(),
                LastSent {
                    version: row.version.max(resumed.unwrap_or(0)),
                    terminal: is_terminal(&row.state),
                    project_time: row.project_time,
                },
            );
            // A resumed allocation is brought up to date after the
            // snapshot, version by version, instead of re-sent.
            if let Some(seen) = resumed {
                if row.version > seen {
                    catch_up.push((row.allocation_id.clone(), seen, row.version));
                }
                continue;
            }
            let message = pb::WatchAllocationsResponse {
                r#type: pb::WatchEventType::Snapshot as i32,
                view: Some(row.to_proto().map_err(Status::from)?),
            };
            tokio::select! {
                sent = tx.send(Ok(message)) => if sent.is_err() { return Ok(()) },
                _ = stopping.cancelled() => {
                    return Err(Status::unavailable("the viewer is shutting down; reconnect to another replica"));
                }
            }
        }
        match page.last() {
            Some(row) if full => after = Some((row.create_time, row.allocation_id.clone())),
            _ => break,
        }
    }
    let end = pb::WatchAllocationsResponse {
        r#type: pb::WatchEventType::SnapshotEnd as i32,
        view: None,
    };
    // Like the snapshot, its end waits for room: the last page's sends
    // leave the buffer full until the client reads, and a client reading
    // a snapshot at its own pace has not fallen behind any change.
    tokio::select! {
        sent = tx.send(Ok(end)) => if sent.is_err() { return Ok(()) },
        _ = stopping.cancelled() => {
            return Err(Status::unavailable("the viewer is shutting down; reconnect to another replica"));
        }
    }
    for (id, seen, current) in catch_up {
        let rows = db
            .read_short(move |c| store::history_after(c, &id, seen, current))
            .await
            .map_err(Status::from)?;
        for row in rows {
            let message = change(history_view(&row).map_err(Status::from)?);
            tokio::select! {
                sent = tx.send(Ok(message)) => if sent.is_err() { return Ok(()) },
                _ = stopping.cancelled() => {
                    return Err(Status::unavailable("the viewer is shutting down; reconnect to another replica"));
                }
            }
        }
    }

    // Versions read but not sendable yet (the one before is missing).
    let mut waiting: HashMap<String, BTreeMap<i64, (LastSent, pb::AllocationView)>> =
        HashMap::new();
    let mut since = start - LAG;
    let mut next_catch_up = Instant::now() + CATCH_UP;
    let waker = changes.waker(filter.tenant.as_deref());
    loop {
        let notified = waker.notified();
        let poll_start = time::now_micros();
        // Keys first: most of an ordinary poll's window was sent already.
        let keys = read_window(db, filter, since, store::change_keys_since).await?;
        let mut full = keys.len() as i64 == BATCH;
        let mut newest = since;
        let mut unsent_from: Option<i64> = None;
        for (id, version, project_time) in &keys {
            newest = newest.max(*project_time);
            let seen = last.get(id).map_or(0, |l| l.version);
            let held = waiting.get(id).is_some_and(|w| w.contains_key(version));
            if *version > seen && !held {
                unsent_from = Some(unsent_from.map_or(*project_time, |t| t.min(*project_time)));
            }
        }
        if let Some(from) = unsent_from {
            let rows = read_window(db, filter, from, store::changes_since).await?;
            if rows.len() as i64 == BATCH {
                // Not every unsent key was reached: go on from the last
                // row read rather than from the newest key.
                full = true;
                newest = rows.last().map_or(from, |r| r.project_time);
            }
            for row in rows {
                let seen = last.get(&row.allocation_id).map_or(0, |l| l.version);
                if row.version <= seen {
                    continue;
                }
                let view = history_view(&row).map_err(Status::from)?;
                let sent = LastSent {
                    version: row.version,
                    terminal: is_terminal(&row.state),
                    project_time: row.project_time,
                };
                waiting
                    .entry(row.allocation_id.clone())
                    .or_default()
                    .insert(row.version, (sent, view));
            }
        }
        let mut done = Vec::new();
        for (id, versions) in waiting.iter_mut() {
            let seen = last.entry(id.clone()).or_insert(LastSent {
                version: 0,
                terminal: false,
                project_time: 0,
            });
            while let Some(entry) = versions.first_entry() {
                // An allocation missing from the snapshot had no row when
                // it was taken, so its versions start at 1 here.
                if *entry.key() != seen.version + 1 {
                    break;
                }
                let (_, (sent, view)) = entry.remove_entry();
                // Versions can be projected out of order: remember the
                // latest projection of any, so pruning never drops an
                // allocation a later read could still return.
                *seen = LastSent {
                    project_time: sent.project_time.max(seen.project_time),
                    ..sent
                };
                if let Sent::Stop = send(tx, overflow, change(view)) {
                    return Ok(());
                }
            }
            if versions.is_empty() {
                done.push(id.clone());
            }
        }
        for id in done {
            waiting.remove(&id);
        }
        if full {
            since = newest;
            continue;
        }
        since = if Instant::now() >= next_catch_up {
            next_catch_up = Instant::now() + CATCH_UP;
            // What ended before the window can have no later version, so
            // it needs no entry: keeps a long watch's memory bounded by
            // what is live, not by every allocation it ever saw.
            let horizon = poll_start - LAG;
            last.retain(|_, l| !(l.terminal && l.project_time < horizon));
            horizon
        } else {
            poll_start - OVERLAP
        };
        tokio::select! {
            _ = stopping.cancelled() => {
                return Err(Status::unavailable("the viewer is shutting down; reconnect to another replica"));
            }
            _ = tx.closed() => return Ok(()),
            _ = notified => {}
            _ = tokio::time::sleep(POLL) => {}
        }
    }
}

/// `store::changes_since` and `store::change_keys_since`: (connection,
/// tenant, allocation, since, limit).
type WindowQuery<T> = fn(
    &mut gpualloc_storage::DbConnection,
    Option<&str>,
    Option<&str>,
    i64,
    i64,
) -> Result<Vec<T>, Error>;

/// One read of the watched window from `since`, at most [`BATCH`] rows:
/// its keys ([`store::change_keys_since`]) or whole rows
/// ([`store::changes_since`]).
async fn read_window<T: Send + 'static>(
    db: &Db,
    filter: &Filter,
    since: i64,
    query: WindowQuery<T>,
) -> Result<Vec<T>, Status> {
    let f = filter.clone();
    db.read_short(move |c| {
        query(
            c,
            f.tenant.as_deref(),
            f.allocation_id.as_deref(),
            since,
            BATCH,
        )
    })
    .await
    .map_err(Status::from)
}

/// The last version sent of one allocation, and the latest projection
/// time of any version sent.
#[derive(Clone, Copy, Debug)]
struct LastSent {
    version: i64,
    terminal: bool,
    project_time: i64,
}

fn is_terminal(state: &str) -> bool {
    gpualloc_domain::State::parse(state).is_some_and(|s| s.is_terminal())
}

fn history_view(row: &store::HistoryRow) -> Result<pb::AllocationView, Error> {
    let allocation = ev::AllocationSnapshot::decode(row.snapshot.as_slice())
        .map(crate::wire::allocation)
        .map_err(|e| Error::BadEvent(format!("stored snapshot of {}: {e}", row.allocation_id)))?;
    Ok(pb::AllocationView {
        allocation: Some(allocation),
        hold_position: 0,
        project_time: Some(time::to_timestamp(row.project_time)),
    })
}

#[cfg(test)]
mod tests {
    use std::{future::Future, pin::pin, task::Poll};

    use super::*;

    /// Whether a `notified()` future created before `act` has fired.
    fn woken(waker: &Arc<Notify>, act: impl FnOnce()) -> bool {
        let mut notified = pin!(waker.notified());
        notified.as_mut().enable();
        act();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        matches!(notified.as_mut().poll(&mut cx), Poll::Ready(()))
    }

    #[test]
    fn a_change_wakes_its_tenants_watchers_and_those_of_every_tenant_only() {
        let changes = Changes::default();
        let (a, b, every) = (
            changes.waker(Some("a")),
            changes.waker(Some("b")),
            changes.waker(None),
        );
        assert!(woken(&a, || changes.notify([Some("a")])));
        assert!(!woken(&b, || changes.notify([Some("a")])));
        assert!(woken(&every, || changes.notify([Some("a")])));
        // A change of no tenant in particular wakes everyone.
        assert!(woken(&b, || changes.notify([None])));
    }
}
