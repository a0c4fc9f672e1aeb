//! Idempotent, batched, durable pull consumers.
//!
//! A fetched batch is applied in one database transaction: for each event
//! the inbox is claimed and the handler's effect and emitted events are
//! written together. Messages are acked only after the commit, so a crash
//! at any point either redelivers (and the inbox skips what committed) or
//! loses nothing. If a batch fails, its events are retried one by one so
//! that one bad event cannot hold back the others.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use async_nats::jetstream::{
    AckKind, Message,
    consumer::{AckPolicy, DeliverPolicy, PullConsumer, pull},
};
use futures::StreamExt;
use gpualloc_domain::time::now_micros;
use gpualloc_storage::{Db, DbConnection, TxError, inbox};
use tokio_util::sync::CancellationToken;

use gpualloc_telemetry::{METRICS, labels, trace};
use tracing::field::Empty;

use crate::{Bus, Emitter, Event, Relay, TRACE_HEADERS, decode};

/// Applies events of one durable consumer.
pub trait Handler: Send + Sync + 'static {
    type Error: TxError + std::fmt::Display;

    /// Applies `event` inside the consumer's transaction; events to emit go
    /// to `emit` (they commit with the effect). Must be deterministic in the
    /// database state: it may run again after a rolled-back attempt.
    fn handle(
        &self,
        conn: &mut DbConnection,
        emit: &mut Emitter,
        event: &Event,
    ) -> Result<(), Self::Error>;

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
        db: Db,
        bus: Bus,
        spec: ConsumerSpec,
        handler: Arc<H>,
        relay: Relay,
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
                    let backoff = Duration::from_millis((100u64 << failures.min(5)).min(2_000));
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(backoff) => {}
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
            process(&db, &spec, &handler, &relay, messages).await;
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
    let mut delay = Duration::from_millis(100);
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
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(2));
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
    /// What the events it causes carry on: this span's context.
    headers: BTreeMap<String, String>,
    /// The consumer span (OpenTelemetry messaging conventions), a child of
    /// the producer's; it ends when the item is acked.
    _span: tracing::Span,
}

async fn process<H: Handler>(
    db: &Db,
    spec: &ConsumerSpec,
    handler: &Arc<H>,
    relay: &Relay,
    messages: Vec<Message>,
) {
    let mut items = Vec::with_capacity(messages.len());
    for message in messages {
        match decode(&message.payload) {
            Ok(event) => {
                let inbound = trace_headers(&message);
                let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
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
                    headers,
                    _span: span,
                });
            }
            Err(e) => {
                // Retrying cannot make it decodable; keep the stream moving.
                tracing::error!(durable = %spec.durable, subject = %message.subject, error = %e, "dropping poison message");
                let _ = message.ack_with(AckKind::Term).await;
            }
        }
    }
    if items.is_empty() {
        return;
    }
    let events: Vec<(Event, BTreeMap<String, String>)> = items
        .iter()
        .map(|i| (i.event.clone(), i.headers.clone()))
        .collect();
    match apply(db, spec, handler, events).await {
        Ok((applied, emitted)) => {
            for item in &items {
                let _ = item.message.ack().await;
            }
            // A relay round is a read transaction: only when there is
            // something to publish (the viewer, for one, emits nothing).
            if emitted {
                relay.nudge();
            }
            count_applied(spec, &applied);
            handler.committed(&applied);
        }
        Err(e) if items.len() > 1 => {
            tracing::warn!(durable = %spec.durable, error = %e, events = items.len(), "batch failed; retrying its events one by one");
            for item in items {
                let one = vec![(item.event.clone(), item.headers.clone())];
                match apply(db, spec, handler, one).await {
                    Ok((applied, emitted)) => {
                        let _ = item.message.ack().await;
                        if emitted {
                            relay.nudge();
                        }
                        count_applied(spec, &applied);
                        handler.committed(&applied);
                    }
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

fn count_applied(spec: &ConsumerSpec, applied: &[Event]) {
    METRICS
        .consumer_events
        .get_or_create(&labels([("consumer", &spec.durable)]))
        .inc_by(applied.len() as u64);
}

async fn nak(spec: &ConsumerSpec, item: &Item, error: &str) {
    let delivered = item.message.info().map(|i| i.delivered).unwrap_or(1);
    let delay = Duration::from_millis((100u64 << (delivered.clamp(1, 8) - 1) as u32).min(10_000));
    tracing::warn!(
        durable = %spec.durable,
        event_id = %item.event.event_id,
        delivered,
        error,
        "event failed; redelivering later"
    );
    let _ = item.message.ack_with(AckKind::Nak(Some(delay))).await;
}

async fn apply<H: Handler>(
    db: &Db,
    spec: &ConsumerSpec,
    handler: &Arc<H>,
    events: Vec<(Event, BTreeMap<String, String>)>,
) -> Result<(Vec<Event>, bool), H::Error> {
    let handler = handler.clone();
    let durable = spec.durable.clone();
    let origin = spec.origin.clone();
    db.write(move |conn| {
        let now = now_micros();
        let mut applied = Vec::new();
        let mut emitted = false;
        for (event, headers) in &events {
            if !inbox::claim(conn, &durable, &event.event_id, now)? {
                continue;
            }
            let mut emit = Emitter::new(&origin, now, headers.clone());
            handler.handle(conn, &mut emit, event)?;
            emitted |= !emit.is_empty();
            emit.flush(conn)?;
            applied.push(event.clone());
        }
        Ok((applied, emitted))
    })
    .await
}
