//! The allocation side of the reconciler: finds sagas that have waited on
//! the pool past a deadline (an event lost by the broker, a pool that was
//! down for long) and re-drives them. Publishing outbox rows that are still
//! unpublished is the relay's periodic sweep (every replica, including rows
//! left by a replica that died); this task covers what the outbox cannot:
//! an event that was published and acknowledged and then lost.

use std::time::Duration;

use gpualloc_domain::time::now_micros;
use gpualloc_saga::{Emitter, Relay};
use gpualloc_storage::Db;
use tokio_util::sync::CancellationToken;

use crate::{Error, ops};

const BATCH: i64 = 200;

pub async fn run(
    db: Db,
    relay: Relay,
    origin: String,
    policy: ops::RedrivePolicy,
    cancel: CancellationToken,
) {
    // Look twice per deadline, so a stuck saga waits at most 1.5 deadlines.
    let interval = Duration::from_micros((policy.stuck_after / 2).max(10_000) as u64);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let origin = origin.clone();
        let result = db
            .write(move |conn| {
                let mut emit = Emitter::new(&origin, now_micros(), Default::default());
                let n = ops::redrive(conn, &mut emit, policy, BATCH)?;
                emit.flush(conn)?;
                Ok::<_, Error>(n)
            })
            .await;
        match result {
            Ok(0) => {}
            Ok(n) => {
                tracing::info!(redriven = n, "reconciler re-drove stuck sagas");
                relay.nudge();
            }
            Err(e) => tracing::warn!(error = %e, "reconciler pass failed"),
        }
    }
}
