//! The allocation side of the reconciler: finds sagas that have waited on
//! the pool past a deadline (an event lost by the broker, a pool that was
//! down for long) and re-drives them. Publishing outbox rows that are still
//! unpublished is the relay's periodic sweep (every replica, including rows
//! left by a replica that died); this task covers what the outbox cannot:
//! an event that was published and acknowledged and then lost.

use std::time::Duration;

use gpualloc_saga::Outbox;
use tokio_util::sync::CancellationToken;

use crate::ops;

const BATCH: i64 = 200;

pub async fn run(outbox: Outbox, policy: ops::RedrivePolicy, cancel: CancellationToken) {
    // Look twice per deadline, so a stuck saga waits at most 1.5 deadlines.
    let interval = Duration::from_micros((policy.stuck_after / 2).max(10_000) as u64);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        let result = outbox
            .write(Default::default(), move |conn, emit| {
                ops::redrive(conn, emit, policy, BATCH)
            })
            .await;
        match result {
            Ok(0) => {}
            Ok(n) => tracing::info!(redriven = n, "reconciler re-drove stuck sagas"),
            Err(e) => tracing::warn!(error = %e, "reconciler pass failed"),
        }
    }
}
