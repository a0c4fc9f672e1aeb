//! Group commit for SQLite. SQLite has one writer, and every commit is
//! durable (`synchronous=FULL`: an fsync of the WAL), so writes queue up
//! behind each other. Instead of one transaction (and one fsync) each, the
//! writes queued while the previous group committed are applied together:
//! one transaction, each write inside its own savepoint (a failing write
//! rolls back only itself), one commit. Nobody is told "done" before the
//! group's commit; if the commit fails, every write in it fails. Nothing
//! waits to fill a group: a write on an idle database commits at once.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use diesel::Connection;
use tokio::sync::{mpsc, oneshot};

use crate::{DbConnection, DbError, TxError};

/// Writes applied in one transaction at most.
const MAX_GROUP: usize = 256;
/// Attempts of a write that fails with a retryable error inside a group
/// (a unique key another write of the group inserted first: run again, it
/// sees that row).
const ATTEMPTS: u32 = 8;

/// One queued write.
pub(crate) trait Work: Send {
    /// Applies the write inside the open group transaction.
    fn apply(&mut self, conn: &mut DbConnection);
    /// Tells the caller, after the group committed (or failed to).
    fn finish(self: Box<Self>, committed: Result<(), DbError>);
}

pub(crate) struct Item<T, E, F> {
    f: F,
    result: Option<Result<T, E>>,
    reply: oneshot::Sender<Result<T, E>>,
}

impl<T, E, F> Item<T, E, F> {
    pub(crate) fn new(f: F, reply: oneshot::Sender<Result<T, E>>) -> Self {
        Self {
            f,
            result: None,
            reply,
        }
    }
}

impl<T, E, F> Work for Item<T, E, F>
where
    T: Send + 'static,
    E: TxError,
    F: FnMut(&mut DbConnection) -> Result<T, E> + Send + 'static,
{
    fn apply(&mut self, conn: &mut DbConnection) {
        let mut attempt = 0;
        self.result = Some(loop {
            // Nested in the group's transaction: a savepoint.
            match conn.transaction(&mut self.f) {
                Err(e) if e.is_retryable() && attempt + 1 < ATTEMPTS => attempt += 1,
                other => break other,
            }
        });
    }

    fn finish(self: Box<Self>, committed: Result<(), DbError>) {
        let result = match (committed, self.result) {
            (Ok(()), Some(r)) => r,
            // A write that failed on its own keeps its own error.
            (Err(_), Some(Err(e))) => Err(e),
            (Err(e), _) => Err(E::from(e)),
            (Ok(()), None) => Err(E::from(DbError::Panic("write was not applied".into()))),
        };
        let _ = self.reply.send(result);
    }
}

pub(crate) type Queue = mpsc::UnboundedSender<Box<dyn Work>>;

/// Runs groups on connections from `pool` (SQLite's single write
/// connection) until every [`Queue`] is dropped. `writes` is bumped after
/// each group's commit, before anyone is answered.
pub(crate) fn start(pool: crate::db::WritePool, writes: Arc<AtomicU64>) -> Queue {
    let (tx, mut rx) = mpsc::unbounded_channel::<Box<dyn Work>>();
    tokio::spawn(async move {
        while let Some(first) = rx.recv().await {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(w) => group.push(w),
                    Err(_) => break,
                }
            }
            let conn = match pool.get().await {
                Ok(c) => c,
                Err(e) => {
                    for w in group {
                        w.finish(Err(DbError::Pool(e.to_string())));
                    }
                    continue;
                }
            };
            // A panic inside a write drops the group; its callers see the
            // writer's reply channel closed.
            let writes = writes.clone();
            let _ = conn.interact(move |c| commit(c, group, &writes)).await;
        }
    });
    tx
}

fn commit(conn: &mut DbConnection, mut group: Vec<Box<dyn Work>>, writes: &AtomicU64) {
    let mut attempt = 0u32;
    let committed = loop {
        let result = conn.transaction::<_, diesel::result::Error, _>(|c| {
            for w in group.iter_mut() {
                w.apply(c);
            }
            Ok(())
        });
        match result {
            // The group's BEGIN or COMMIT itself failed with something
            // worth retrying (another process holds the lock): run it all
            // again.
            Err(e) if crate::is_retryable(&e) && attempt < ATTEMPTS => {
                attempt += 1;
                std::thread::sleep(crate::TX_RETRY.delay(attempt - 1));
            }
            other => break other.map_err(DbError::from),
        }
    };
    writes.fetch_add(1, Ordering::AcqRel);
    for w in group {
        let c = match &committed {
            Ok(()) => Ok(()),
            Err(e) => Err(DbError::Pool(format!("the group commit failed: {e}"))),
        };
        w.finish(c);
    }
}
