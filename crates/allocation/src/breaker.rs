//! The circuit breaker in front of CheckQuota (a `failsafe` state machine).
//!
//! Only signs that the pool is not there count as failures: transport
//! errors, `UNAVAILABLE`, `DEADLINE_EXCEEDED` and our own deadline. A
//! verdict — including "over quota" — is a success: the pool answered.
//! After `failures` consecutive failures the breaker opens for a backoff
//! (exponential with jitter between `open_min` and `open_max`); while open
//! no call is made and the request is accepted as PENDING at once (the
//! saga decides). Then it is half-open: failsafe would let every call
//! through, so a semaphore admits at most `probes` at a time and treats
//! the rest as rejected. One success closes it; a failure opens it again.
//!
//! Every transition is logged and exported as `gpualloc_breaker_state`
//! (0 closed, 1 open, 2 half-open).

use std::{
    sync::{
        Arc,
        atomic::{AtomicU8, Ordering},
    },
    time::Duration,
};

use failsafe::{
    StateMachine,
    failure_policy::{ConsecutiveFailures, consecutive_failures},
};
use gpualloc_telemetry::labels;

use crate::metrics::METRICS;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// The breaker's settings.
#[derive(Clone, Copy, Debug)]
pub struct BreakerConfig {
    pub failures: u32,
    pub open_min: Duration,
    pub open_max: Duration,
    pub probes: usize,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: 5,
            open_min: Duration::from_secs(5),
            open_max: Duration::from_secs(60),
            probes: 1,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

/// Mirrors failsafe's state for the probe limit, the metric and the log.
#[derive(Debug)]
struct StateMirror {
    target: &'static str,
    state: AtomicU8,
}

impl StateMirror {
    fn set(&self, to: State) {
        let from = self.state.swap(to as u8, Ordering::SeqCst);
        if from == to as u8 {
            return;
        }
        let name = match to {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        };
        METRICS
            .breaker_state
            .get_or_create(&labels([("target", self.target)]))
            .set(to as i64);
        METRICS
            .breaker_transitions
            .get_or_create(&labels([("target", self.target), ("to", name)]))
            .inc();
        match to {
            State::Open => tracing::warn!(
                target_service = self.target,
                "circuit breaker OPEN: calls to {} stop; requests are accepted as PENDING",
                self.target
            ),
            State::HalfOpen => {
                tracing::info!(
                    target_service = self.target,
                    "circuit breaker HALF-OPEN: probing"
                )
            }
            State::Closed => {
                tracing::info!(
                    target_service = self.target,
                    "circuit breaker CLOSED: calls resume"
                )
            }
        }
    }
}

/// failsafe's instrument: shares the mirror with the breaker.
#[derive(Clone, Debug)]
struct Hooks(Arc<StateMirror>);

impl failsafe::Instrument for Hooks {
    fn on_call_rejected(&self) {}
    fn on_open(&self) {
        self.0.set(State::Open);
    }
    fn on_half_open(&self) {
        self.0.set(State::HalfOpen);
    }
    fn on_closed(&self) {
        self.0.set(State::Closed);
    }
}

/// Open periods: doubling from `start` up to `max`, with equal jitter so
/// that replicas do not probe in step. (failsafe's own backoffs refuse
/// periods under a second.)
#[derive(Clone, Debug)]
struct OpenFor {
    start: Duration,
    max: Duration,
    attempt: u32,
}

impl Iterator for OpenFor {
    type Item = Duration;

    fn next(&mut self) -> Option<Duration> {
        let exp = self
            .start
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        let half = exp / 2;
        let extra = rand::random_range(0..=(exp - half).as_micros() as u64);
        Some(half + Duration::from_micros(extra))
    }
}

type Machine = StateMachine<ConsecutiveFailures<OpenFor>, Hooks>;

#[derive(Clone, Debug)]
pub struct Breaker {
    machine: Machine,
    watch: Arc<StateMirror>,
    probes: Arc<Semaphore>,
}

/// Permission to make one call.
#[derive(Debug)]
pub struct Ticket {
    _probe: Option<OwnedSemaphorePermit>,
}

/// How a call went, for the breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The target answered (whatever it said).
    Answered,
    /// The target is not there: transport error, UNAVAILABLE, deadline.
    Unreachable,
}

impl Breaker {
    pub fn new(target: &'static str, config: BreakerConfig) -> Breaker {
        let watch = Arc::new(StateMirror {
            target,
            state: AtomicU8::new(State::Closed as u8),
        });
        METRICS
            .breaker_state
            .get_or_create(&labels([("target", target)]))
            .set(0);
        let policy = consecutive_failures(
            config.failures.max(1),
            OpenFor {
                start: config.open_min,
                max: config.open_max.max(config.open_min),
                attempt: 0,
            },
        );
        let machine = failsafe::Config::new()
            .failure_policy(policy)
            .instrument(Hooks(watch.clone()))
            .build();
        Breaker {
            machine,
            watch,
            probes: Arc::new(Semaphore::new(config.probes.max(1))),
        }
    }

    pub fn state(&self) -> State {
        match self.watch.state.load(Ordering::SeqCst) {
            1 => State::Open,
            2 => State::HalfOpen,
            _ => State::Closed,
        }
    }

    /// A ticket to call now, or `None` while the breaker holds calls back.
    pub fn admit(&self) -> Option<Ticket> {
        if !self.machine.is_call_permitted() {
            return None;
        }
        if self.state() == State::HalfOpen {
            let probe = self.probes.clone().try_acquire_owned().ok()?;
            return Some(Ticket {
                _probe: Some(probe),
            });
        }
        Some(Ticket { _probe: None })
    }

    /// Records the outcome of a call made with `ticket`.
    pub fn record(&self, _ticket: Ticket, outcome: Outcome) {
        match outcome {
            Outcome::Answered => self.machine.on_success(),
            Outcome::Unreachable => self.machine.on_error(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(open: Duration) -> BreakerConfig {
        BreakerConfig {
            failures: 3,
            open_min: open,
            open_max: open,
            probes: 1,
        }
    }

    #[test]
    fn opens_after_consecutive_failures_only() {
        let b = Breaker::new("unit-a", config(Duration::from_secs(60)));
        for _ in 0..2 {
            let t = b.admit().unwrap();
            b.record(t, Outcome::Unreachable);
        }
        // An answer in between resets the count.
        let t = b.admit().unwrap();
        b.record(t, Outcome::Answered);
        for _ in 0..2 {
            let t = b.admit().unwrap();
            b.record(t, Outcome::Unreachable);
        }
        assert_eq!(b.state(), State::Closed);
        let t = b.admit().unwrap();
        b.record(t, Outcome::Unreachable);
        assert_eq!(b.state(), State::Open);
        assert!(b.admit().is_none());
    }

    #[test]
    fn half_open_admits_a_bounded_number_of_probes() {
        let b = Breaker::new("unit-b", config(Duration::from_millis(1)));
        for _ in 0..3 {
            let t = b.admit().unwrap();
            b.record(t, Outcome::Unreachable);
        }
        assert_eq!(b.state(), State::Open);
        std::thread::sleep(Duration::from_millis(5));
        let probe = b.admit().expect("a probe after the open period");
        assert_eq!(b.state(), State::HalfOpen);
        // failsafe alone would let these through too.
        assert!(b.admit().is_none());
        assert!(b.admit().is_none());
        b.record(probe, Outcome::Answered);
        assert_eq!(b.state(), State::Closed);
        assert!(b.admit().is_some());
    }

    #[test]
    fn a_failed_probe_opens_it_again() {
        let b = Breaker::new("unit-c", config(Duration::from_millis(1)));
        for _ in 0..3 {
            let t = b.admit().unwrap();
            b.record(t, Outcome::Unreachable);
        }
        std::thread::sleep(Duration::from_millis(5));
        let probe = b.admit().unwrap();
        b.record(probe, Outcome::Unreachable);
        assert_eq!(b.state(), State::Open);
    }
}
