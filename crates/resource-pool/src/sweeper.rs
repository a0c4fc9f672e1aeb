//! Releases leases and ends overdue holds on time. Runs on every replica;
//! the placement lock and the state guards make concurrent sweeps harmless
//! (a reservation is released once). On start it catches up with whatever
//! fell due while the service was down.

use std::time::Duration;

use gpualloc_domain::time::now_micros;
use gpualloc_saga::Outbox;
use tokio_util::sync::CancellationToken;

use crate::{Error, saga, store};

const BATCH: i64 = 500;

pub async fn run(outbox: Outbox, interval: Duration, cancel: CancellationToken) {
    loop {
        let result = outbox
            .write(Default::default(), move |conn, emit| {
                let swept = saga::sweep(conn, emit, BATCH)?;
                let next = store::next_deadline(conn)?;
                Ok::<_, Error>((swept, next))
            })
            .await;
        let wait = match result {
            Ok((swept, next)) => {
                if swept.expired + swept.hold_timeouts > 0 {
                    tracing::info!(
                        expired = swept.expired,
                        hold_timeouts = swept.hold_timeouts,
                        "sweep"
                    );
                }
                let full = swept.expired as i64 == BATCH || swept.hold_timeouts as i64 == BATCH;
                match next {
                    _ if full => Duration::ZERO,
                    // Wake at the next deadline, but at least every interval
                    // (new leases are granted by other transactions).
                    Some(t) => Duration::from_micros(
                        (t - now_micros()).clamp(0, interval.as_micros() as i64) as u64,
                    ),
                    None => interval,
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "sweep failed");
                interval
            }
        };
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(wait.max(Duration::from_millis(5))) => {}
        }
    }
}
