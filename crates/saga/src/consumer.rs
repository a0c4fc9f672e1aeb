//! Idempotent, batched, durable pull consumers.
//!
//! A fetched batch is applied in one database transaction: for each event
//! the inbox is claimed and the handler's effect and emitted events are
//! written together. Messages are acked only after the commit, so a crash
//! at any point either redelivers (and the inbox skips what committed) or
//! loses nothing. If a batch fails, its events are retried one by one so
//! that one bad event cannot hold back the others.
//!
//! Consumers trust nothing they read: an event whose subject does not
//! match its payload, that contradicts the stored aggregate (another
//! tenant, an unknown allocation) or is otherwise invalid is **poison**:
//! acknowledged so that it never comes back, never applied, counted in
//! `gpualloc_events_poison_total` and logged once with its event id. An
//! event that is too far ahead — a version jump past the next expected
//! version — is **parked**: put back for a later delivery, so that the
//! missing version can arrive first; a handler decides what a jump that
//! outlasts the parking means ([`Delivery::parked_long_enough`]).

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use async_nats::jetstream::{
    AckKind, Message,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
};
use futures::StreamExt;
use gpualloc_domain::Backoff;
use gpualloc_storage::{DbConnection, TxError, inbox};
use tokio_util::sync::CancellationToken;

use gpualloc_telemetry::{METRICS, labels, trace};
use tracing::field::Empty;

use crate::{Bus, Emitter, Event, Outbox, TRACE_HEADERS, decode};

/// What a handler made of an event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Applied, or a no-op by the state machine's guards: acknowledged.
    Applied,
    /// Not applicable yet (an earlier version is missing). The handler
    /// wrote nothing; the event is delivered again later.
    Park(String),
    /// Invalid. The handler wrote nothing; the event is acknowledged and
    /// never applied. `reason` is a metric label: a fixed word.
    Poison {
        reason: &'static str,
        detail: String,
    },
}

impl Outcome {
    pub fn poison(reason: &'static str, detail: impl Into<String>) -> Outcome {
        Outcome::Poison {
            reason,
            detail: detail.into(),
        }
    }
}

/// How many times JetStream has delivered an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delivery {
    pub delivered: u64,
}

/// Deliveries an event may be parked for (about three seconds in all,
/// with the doubling delays of [`park_delay`]).
pub const MAX_PARKED: u64 = 6;

/// The largest version jump a handler applies after parking: a lost event
/// or two is recovery; a jump of thousands is a forgery that would make
/// every later real version look stale and freeze the aggregate.
pub const MAX_VERSION_JUMP: i64 = 16;

impl Delivery {
    /// Whether the event has been parked as long as it may be: a missing
    /// version that has not come by now was lost (a broker that lost
    /// data), and waiting longer recovers nothing.
    pub fn parked_long_enough(&self) -> bool {
        self.delivered >= MAX_PARKED
    }
}

/// What to do with an event of version `version` of an aggregate whose
/// last applied version is `last`: apply it when it is the next (or a
/// stale one, which the caller's guards ignore), park a jump, apply a
/// small jump that outlasted the parking, refuse a large one.
pub fn version_gate(version: i64, last: i64, delivery: Delivery) -> Option<Outcome> {
    if version <= last + 1 {
        return None;
    }
    if version - last > MAX_VERSION_JUMP {
        return Some(Outcome::poison(
            "version",
            format!("version {version} jumps from {last}, more than {MAX_VERSION_JUMP}"),
        ));
    }
    if delivery.parked_long_enough() {
        return None;
    }
    Some(Outcome::Park(format!(
        "version {version} arrived before {}",
        last + 1
    )))
}

/// Applies events of one durable consumer.
pub trait Handler: Send + Sync + 'static {
    type Error: TxError + std::fmt::Display;

    /// Applies `event` inside the consumer's transaction; events to emit go
    /// to `emit` (they commit with the effect). Must be deterministic in the
    /// database state: it may run again after a rolled-back attempt. It
    /// must validate before it writes: a [`Outcome::Park`] or
    /// [`Outcome::Poison`] must leave nothing behind.
    fn handle(
        &self,
        conn: &mut DbConnection,
        emit: &mut Emitter,
        event: &Event,
        delivery: Delivery,
    ) -> Result<Outcome, Self::Error>;

    /// Called once the events of a batch have committed (for example to
    /// wake watchers). Only events applied for the first time are passed.
    fn committed(&self, _events: &[Event]) {}
}

/// A durable consumer's identity and tuning.
#[derive(Clone, Debug)]
pub struct ConsumerSpec {
    /// Durable name, shared by all replicas of a service (they split the
    /// work); also the inbox's consumer key.
    pub durable: String,
    /// Filter relative to the prefix (see [`crate::subjects`]).
    pub filter: &'static str,
    /// Messages per fetch, applied in one transaction.
    pub batch: usize,
    /// Redelivery after this long without an ack.
    pub ack_wait: Duration,
    /// This replica's id (origin of emitted outbox rows).
    pub origin: String,
}

impl ConsumerSpec {
    pub fn new(durable: &str, filter: &'static str, origin: &str) -> Self {
        Self {
            durable: durable.to_owned(),
            filter,
            batch: 256,
            ack_wait: Duration::from_secs(30),
            origin: origin.to_owned(),
        }
    }
}

/// Consecutive failed fetches after which the stream and consumer are
/// provisioned again.
const REPROVISION_AFTER: u32 = 3;

/// How often the consumer's lag is read from the server for the metrics.
const LAG_SAMPLE: Duration = Duration::from_secs(2);

async fn sample_lag(consumer: &mut PullConsumer, durable: &str) {
    if let Ok(info) = consumer.info().await {
        let l = labels([("consumer", durable)]);
        METRICS
            .consumer_pending
            .get_or_create(&l)
            .set(info.num_pending as i64);
        METRICS
            .consumer_ack_pending
            .get_or_create(&l)
            .set(info.num_ack_pending as i64);
    }
}

/// A running consumer.
#[derive(Debug)]
pub struct Consumer;

impl Consumer {
    /// Creates the durable consumer if needed (idempotent) and applies
    /// events until `cancel` fires. The batch in hand when it fires is
    /// finished and acked first.
    pub async fn run<H: Handler>(
        outbox: Outbox,
        bus: Bus,
        spec: ConsumerSpec,
        handler: Arc<H>,
        cancel: CancellationToken,
    ) {
        let Some(mut consumer) = provision(&bus, &spec, &cancel).await else {
            return;
        };
        tracing::info!(durable = %spec.durable, filter = spec.filter, "consumer started");
        let mut failures = 0u32;
        let mut next_sample = tokio::time::Instant::now();
        while !cancel.is_cancelled() {
            if tokio::time::Instant::now() >= next_sample {
                next_sample = tokio::time::Instant::now() + LAG_SAMPLE;
                sample_lag(&mut consumer, &spec.durable).await;
            }
            let batch = tokio::select! {
                _ = cancel.cancelled() => break,
                b = fetch(&consumer, spec.batch) => b,
            };
            let messages = match batch {
                Ok(m) => {
                    failures = 0;
                    m
                }
                Err(e) => {
                    failures += 1;
                    tracing::warn!(durable = %spec.durable, error = format!("{e:#}"), "fetch failed");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(RETRY.delay(failures)) => {}
                    }
                    if failures.is_multiple_of(REPROVISION_AFTER) {
                        // A NATS server that came back without its data has
                        // neither stream nor consumer: create them again
                        // (idempotent when they do exist). The outbox relay
                        // and the reconcilers repair what was lost with them.
                        match provision(&bus, &spec, &cancel).await {
                            Some(c) => consumer = c,
                            None => break,
                        }
                    }
                    continue;
                }
            };
            if messages.is_empty() {
                continue;
            }
            process(&outbox, &spec, &bus.config.prefix, &handler, messages).await;
        }
        // Acks are fire-and-forget publishes: push them out before exiting.
        let _ = bus.client.flush().await;
        tracing::info!(durable = %spec.durable, "consumer stopped");
    }
}

async fn provision(
    bus: &Bus,
    spec: &ConsumerSpec,
    cancel: &CancellationToken,
) -> Option<PullConsumer> {
    let mut tries = 0;
    loop {
        let attempt = async {
            let stream = bus.provision().await?;
            let config = pull::Config {
                durable_name: Some(spec.durable.clone()),
                filter_subject: bus.subject(spec.filter),
                ack_policy: AckPolicy::Explicit,
                ack_wait: spec.ack_wait,
                deliver_policy: DeliverPolicy::All,
                // Never give up on an event: a saga step must not be lost.
                max_deliver: -1,
                max_ack_pending: 20_000,
                ..Default::default()
            };
            stream
                .get_or_create_consumer(&spec.durable, config)
                .await
                .map_err(|e| anyhow::Error::from_boxed(Box::new(e)))
        };
        match attempt.await {
            Ok(c) => return Some(c),
            Err(e) => {
                tracing::warn!(durable = %spec.durable, error = format!("{e:#}"), "consumer not ready yet")
            }
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(RETRY.delay(tries)) => {}
        }
        tries += 1;
    }
}

async fn fetch(consumer: &PullConsumer, batch: usize) -> anyhow::Result<Vec<Message>> {
    let mut stream = consumer
        .fetch()
        .max_messages(batch)
        .expires(Duration::from_millis(500))
        .messages()
        .await
        .map_err(|e| anyhow::Error::from_boxed(Box::new(e)))?;
    let mut out = Vec::new();
    while let Some(m) = stream.next().await {
        match m {
            Ok(m) => out.push(m),
            Err(e) => {
                if out.is_empty() {
                    return Err(anyhow::Error::from_boxed(e));
                }
                break;
            }
        }
    }
    Ok(out)
}

/// Trace headers of a message, passed on to the events it causes.
pub fn trace_headers(message: &Message) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    if let Some(h) = &message.headers {
        for name in TRACE_HEADERS {
            if let Some(v) = h.get(*name) {
                out.insert((*name).to_owned(), v.as_str().to_owned());
            }
        }
    }
    out
}

struct Item {
    message: Message,
    event: Event,
    delivery: Delivery,
    /// What the events it causes carry on: this span's context.
    headers: BTreeMap<String, String>,
    /// The consumer span (OpenTelemetry messaging conventions), a child of
    /// the producer's; it ends when the item is acked.
    _span: tracing::Span,
}

/// Sets an invalid message aside: acknowledged (terminated: JetStream
/// never delivers it again), never applied, counted and logged once.
async fn poison(
    spec: &ConsumerSpec,
    message: &Message,
    event_id: &str,
    reason: &str,
    detail: &str,
) {
    METRICS
        .events_poison
        .get_or_create(&labels([("consumer", &spec.durable), ("reason", reason)]))
        .inc();
    tracing::error!(
        durable = %spec.durable,
        subject = %message.subject,
        event_id,
        reason,
        detail,
        "poison event set aside: acknowledged, not applied"
    );
    let _ = message.ack_with(AckKind::Term).await;
}

/// How long a parked event waits before its next delivery: doubling from
/// 100 ms.
pub fn park_delay(delivered: u64) -> Duration {
    Backoff::new(Duration::from_millis(100), Duration::from_millis(12_800))
        .delay(delivered.clamp(1, 8) as u32 - 1)
}

/// Retries of fetches and of provisioning the consumer.
const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));

/// Redeliveries of an event whose transaction failed.
const NAK: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));

async fn park(spec: &ConsumerSpec, item: &Item, why: &str) {
    METRICS
        .events_parked
        .get_or_create(&labels([("consumer", &spec.durable)]))
        .inc();
    tracing::debug!(durable = %spec.durable, event_id = %item.event.event_id, why, "event parked");
    let delay = park_delay(item.delivery.delivered);
    let _ = item.message.ack_with(AckKind::Nak(Some(delay))).await;
}

async fn process<H: Handler>(
    outbox: &Outbox,
    spec: &ConsumerSpec,
    prefix: &str,
    handler: &Arc<H>,
    messages: Vec<Message>,
) {
    let mut items = Vec::with_capacity(messages.len());
    for message in messages {
        let event = match decode(&message.payload) {
            Ok(event) => event,
            Err(e) => {
                // Retrying cannot make it decodable; keep the stream moving.
                poison(spec, &message, "", "undecodable", &e).await;
                continue;
            }
        };
        // The subject is what the bus permissions check: a payload must
        // travel on its own subject, or a publisher allowed one kind of
        // event could smuggle in another.
        let expected = event
            .payload
            .as_ref()
            .map(|p| format!("{prefix}.{}", crate::subjects::of(p)));
        if expected.as_deref() != Some(message.subject.as_str()) {
            let detail = format!(
                "a {} payload on {}",
                expected.as_deref().unwrap_or("missing"),
                message.subject
            );
            poison(spec, &message, &event.event_id, "subject", &detail).await;
            continue;
        }
        let inbound = trace_headers(&message);
        let delivered = message.info().map(|i| i.delivered).unwrap_or(1).max(1) as u64;
        if delivered > 1 {
            METRICS
                .consumer_redeliveries
                .get_or_create(&labels([("consumer", &spec.durable)]))
                .inc();
        }
        let span = tracing::info_span!(
            "process",
            otel.name = %format!("{} process", message.subject),
            otel.kind = "consumer",
            messaging.system = "nats",
            messaging.operation.type = "process",
            messaging.operation.name = "process",
            messaging.destination.name = %message.subject,
            messaging.consumer.group.name = %spec.durable,
            messaging.message.id = %event.event_id,
            messaging.message.delivery_count = delivered,
            gpualloc.allocation_id = %event.allocation_id,
            request_id = inbound.get(trace::REQUEST_ID).map(String::as_str).unwrap_or(""),
            trace_id = Empty,
            span_id = Empty,
        );
        trace::adopt(&span, trace::extract(&inbound));
        let headers = trace::outgoing(&span, &inbound);
        items.push(Item {
            message,
            event,
            delivery: Delivery { delivered },
            headers,
            _span: span,
        });
    }
    if items.is_empty() {
        return;
    }
    let events: Vec<Input> = items
        .iter()
        .map(|i| (i.event.clone(), i.headers.clone(), i.delivery))
        .collect();
    match apply(outbox, spec, handler, events).await {
        Ok(done) => settle(spec, handler, &items, done).await,
        Err(e) if items.len() > 1 => {
            tracing::warn!(durable = %spec.durable, error = %e, events = items.len(), "batch failed; retrying its events one by one");
            for item in items {
                let one = vec![(item.event.clone(), item.headers.clone(), item.delivery)];
                match apply(outbox, spec, handler, one).await {
                    Ok(done) => settle(spec, handler, std::slice::from_ref(&item), done).await,
                    Err(e) => nak(spec, &item, &e.to_string()).await,
                }
            }
        }
        Err(e) => {
            if let Some(item) = items.first() {
                nak(spec, item, &e.to_string()).await;
            }
        }
    }
}

/// After the commit: acknowledge what was applied, park and poison the
/// rest.
async fn settle<H: Handler>(spec: &ConsumerSpec, handler: &Arc<H>, items: &[Item], done: Applied) {
    for (item, outcome) in items.iter().zip(&done.outcomes) {
        match outcome {
            Outcome::Applied => {
                let _ = item.message.ack().await;
            }
            Outcome::Park(why) => park(spec, item, why).await,
            Outcome::Poison { reason, detail } => {
                poison(spec, &item.message, &item.event.event_id, reason, detail).await
            }
        }
    }
    count_applied(spec, &done.applied);
    handler.committed(&done.applied);
}

fn count_applied(spec: &ConsumerSpec, applied: &[Event]) {
    METRICS
        .consumer_events
        .get_or_create(&labels([("consumer", &spec.durable)]))
        .inc_by(applied.len() as u64);
}

async fn nak(spec: &ConsumerSpec, item: &Item, error: &str) {
    let delivered = item.delivery.delivered;
    let delay = NAK.delay(delivered.clamp(1, 8) as u32 - 1);
    tracing::warn!(
        durable = %spec.durable,
        event_id = %item.event.event_id,
        delivered,
        error,
        "event failed; redelivering later"
    );
    let _ = item.message.ack_with(AckKind::Nak(Some(delay))).await;
}

type Input = (Event, BTreeMap<String, String>, Delivery);

/// What one transaction did with a batch.
struct Applied {
    /// Events applied for the first time.
    applied: Vec<Event>,
    /// One per input event, in order (duplicates count as applied).
    outcomes: Vec<Outcome>,
}

async fn apply<H: Handler>(
    outbox: &Outbox,
    spec: &ConsumerSpec,
    handler: &Arc<H>,
    events: Vec<Input>,
) -> Result<Applied, H::Error> {
    let handler = handler.clone();
    let durable = spec.durable.clone();
    outbox
        .write(BTreeMap::new(), move |conn, emit| {
            let now = emit.now();
            let mut done = Applied {
                applied: Vec::new(),
                outcomes: Vec::with_capacity(events.len()),
            };
            for (event, headers, delivery) in &events {
                if inbox::seen(conn, &durable, &event.event_id)? {
                    done.outcomes.push(Outcome::Applied);
                    continue;
                }
                // What this event causes carries its trace context.
                emit.set_headers(headers.clone());
                let mark = emit.mark();
                let outcome = handler.handle(conn, emit, event, *delivery)?;
                if outcome == Outcome::Applied {
                    // Parked and poisoned events leave no inbox row: a
                    // replay of the same event (after the missing version
                    // came, or an operator's outbox replay) is judged
                    // afresh.
                    inbox::record(conn, &durable, &event.event_id, now)?;
                    done.applied.push(event.clone());
                } else {
                    emit.discard_since(mark);
                }
                done.outcomes.push(outcome);
            }
            Ok(done)
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_apply_in_order_park_when_ahead_and_refuse_forged_jumps() {
        let first = Delivery { delivered: 1 };
        let late = Delivery {
            delivered: MAX_PARKED,
        };
        assert_eq!(version_gate(3, 2, first), None);
        assert_eq!(
            version_gate(1, 2, first),
            None,
            "stale: the guards ignore it"
        );
        assert!(matches!(version_gate(4, 2, first), Some(Outcome::Park(_))));
        assert_eq!(version_gate(4, 2, late), None, "a lost version is skipped");
        assert!(matches!(
            version_gate(i64::MAX, 2, late),
            Some(Outcome::Poison {
                reason: "version",
                ..
            })
        ));
        assert!(park_delay(1) < park_delay(5));
    }
}
