//! Load generators. Closed loop: `concurrency` workers send back to back
//! for a while — the maximum throughput. Open loop: requests are started
//! at a fixed rate whatever happens, and latency is measured from the
//! *intended* start, so a server that falls behind shows its queueing
//! instead of slowing the generator down (coordinated omission).

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use hdrhistogram::Histogram;
use tokio::time::Instant;

/// Latencies in microseconds, up to a minute.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000, 3).expect("valid histogram bounds")
}

#[derive(Debug)]
pub struct Outcome {
    pub ok: u64,
    pub errors: u64,
    pub elapsed: Duration,
    pub latency: Histogram<u64>,
}

impl Outcome {
    fn empty() -> Outcome {
        Outcome {
            ok: 0,
            errors: 0,
            elapsed: Duration::ZERO,
            latency: histogram(),
        }
    }

    pub fn rate(&self) -> f64 {
        self.ok as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// `concurrency` workers calling `op(i)` back to back for `duration`.
pub async fn closed<F, Fut>(concurrency: usize, duration: Duration, op: F) -> Outcome
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send,
{
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let workers: Vec<_> = (0..concurrency)
        .map(|_| {
            let (op, stop, next) = (op.clone(), stop.clone(), next.clone());
            tokio::spawn(async move {
                let mut h = histogram();
                let (mut ok, mut errors) = (0, 0);
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let t = Instant::now();
                    if op(i).await {
                        ok += 1;
                        let _ = h.record(t.elapsed().as_micros() as u64);
                    } else {
                        errors += 1;
                    }
                }
                (ok, errors, h)
            })
        })
        .collect();
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut out = Outcome::empty();
    for w in workers {
        if let Ok((ok, errors, h)) = w.await {
            out.ok += ok;
            out.errors += errors;
            let _ = out.latency.add(&h);
        }
    }
    out.elapsed = start.elapsed();
    out
}

/// `op(i)` started at `rate` per second for `duration`; each latency runs
/// from the request's intended start. `op` returns when it is done (for
/// the saga: when the viewer shows ALLOCATED).
pub async fn open<F, Fut>(rate: f64, duration: Duration, op: F) -> Outcome
where
    F: Fn(u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = bool> + Send + 'static,
{
    let rate = rate.max(1.0);
    let total = (rate * duration.as_secs_f64()).ceil() as u64;
    let start = Instant::now();
    let mut tasks = Vec::with_capacity(total as usize);
    for i in 0..total {
        let intended = start + Duration::from_secs_f64(i as f64 / rate);
        tokio::time::sleep_until(intended).await;
        let op = op.clone();
        tasks.push(tokio::spawn(async move {
            let ok = op(i).await;
            (ok, intended.elapsed())
        }));
    }
    let mut out = Outcome::empty();
    for t in tasks {
        match t.await {
            Ok((true, latency)) => {
                out.ok += 1;
                let _ = out.latency.record(latency.as_micros() as u64);
            }
            _ => out.errors += 1,
        }
    }
    out.elapsed = start.elapsed();
    out
}
