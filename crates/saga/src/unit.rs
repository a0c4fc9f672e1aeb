//! [`Outbox`]: one unit of work. Every write in gpualloc that may emit
//! events goes through [`Outbox::write`]: it opens the transaction, hands
//! the closure an [`Emitter`], stages what was emitted in the same
//! transaction, commits, and wakes the relay — the one place that does.

use std::{collections::BTreeMap, sync::Arc};

use gpualloc_domain::time::now_micros;
use gpualloc_storage::{Db, DbConnection, TxError};

use crate::{Emitter, Relay};

/// A database, the relay that publishes its outbox, and this replica's id
/// (the origin of the rows it writes). Cheap to clone.
#[derive(Clone, Debug)]
pub struct Outbox {
    db: Db,
    relay: Relay,
    origin: Arc<str>,
}

impl Outbox {
    pub fn new(db: Db, relay: Relay, origin: &str) -> Self {
        Self {
            db,
            relay,
            origin: origin.into(),
        }
    }

    /// Runs `f` in one write transaction (again on a retryable error, with
    /// a fresh emitter), commits the events it emitted with it, and wakes
    /// the relay when there were any. `headers` is the trace context the
    /// events carry; [`Emitter::set_headers`] changes it for what follows.
    pub async fn write<T, E, F>(&self, headers: BTreeMap<String, String>, mut f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: TxError,
        F: FnMut(&mut DbConnection, &mut Emitter) -> Result<T, E> + Send + 'static,
    {
        let origin = self.origin.clone();
        let (out, emitted) = self
            .db
            .write(move |conn| {
                let mut emit = Emitter::new(&origin, now_micros(), headers.clone());
                let out = f(conn, &mut emit)?;
                let emitted = !emit.is_empty();
                emit.flush(conn)?;
                Ok::<_, E>((out, emitted))
            })
            .await?;
        // A relay round is a read transaction: only when there is
        // something to publish (the viewer, for one, emits nothing).
        if emitted {
            self.relay.nudge();
        }
        Ok(out)
    }
}
