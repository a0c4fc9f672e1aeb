//! The outbox relay: publishes committed events in commit order and marks
//! them published only after JetStream acknowledged them. A crash between
//! the ack and the mark republishes the rows; JetStream drops the copy
//! within the duplicate window (same `Nats-Msg-Id`) and consumers' inboxes
//! after it.

use std::{sync::Arc, time::Duration};

use async_nats::{HeaderMap, jetstream::context::PublishAckFuture};
use bytes::Bytes;
use gpualloc_domain::{Backoff, time::now_micros};
use gpualloc_storage::{Db, DbError, outbox};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::Bus;

/// Relay tuning.
#[derive(Clone, Debug)]
pub struct RelayConfig {
    /// This replica's id, as written in `outbox.origin`.
    pub origin: String,
    /// Rows per publish round (published pipelined, then acked together).
    pub batch: i64,
    /// Poll interval when nobody nudges the relay (rows from other replicas,
    /// retries after errors).
    pub poll: Duration,
    /// Other replicas' rows are published only when older than this: their
    /// writer normally publishes them itself; this picks up after a crash.
    pub foreign_grace: Duration,
    /// The service, as the `service` label of the outbox metrics.
    pub service: String,
}

impl RelayConfig {
    pub fn new(origin: impl Into<String>) -> Self {
        Self {
            service: String::new(),
            origin: origin.into(),
            batch: 512,
            poll: Duration::from_millis(500),
            foreign_grace: Duration::from_secs(5),
        }
    }
}

/// Handle to a running relay.
#[derive(Clone)]
pub struct Relay {
    notify: Arc<Notify>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Relay")
    }
}

impl Default for Relay {
    fn default() -> Self {
        Self::new()
    }
}

impl Relay {
    /// A handle whose task is started later with [`Relay::run`]. Writers can
    /// nudge it before the task runs; nothing is lost, the task drains the
    /// table when it starts.
    pub fn new() -> Self {
        Self {
            notify: Arc::new(Notify::new()),
        }
    }

    /// Asks the relay to publish now (call after committing outbox rows).
    pub fn nudge(&self) {
        self.notify.notify_one();
    }

    /// Publishes until `cancel` fires, then makes a last attempt to drain
    /// what is committed (bounded by `drain_timeout`).
    pub async fn run(
        self,
        db: Db,
        bus: Bus,
        config: RelayConfig,
        cancel: CancellationToken,
        drain_timeout: Duration,
    ) {
        let mut failures = 0u32;
        let mut next_sample = tokio::time::Instant::now();
        loop {
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = self.notify.notified() => {}
                _ = tokio::time::sleep(config.poll) => {}
            }
            let drained = drain(&db, &bus, &config).await;
            // Measured after the round: what is still waiting once the
            // relay did what it could (during a broker outage, everything).
            if tokio::time::Instant::now() >= next_sample {
                next_sample = tokio::time::Instant::now() + BACKLOG_SAMPLE;
                sample_backlog(&db, &config.service).await;
            }
            match drained {
                Ok(_) => failures = 0,
                Err(e) => {
                    failures += 1;
                    tracing::warn!(
                        error = format!("{e:#}"),
                        failures,
                        "outbox relay round failed"
                    );
                    if failures.is_multiple_of(3) && bus.is_connected() {
                        // Connected, yet no acks: the member we talk to
                        // may be cut off from the stream's quorum. Another
                        // member may not be.
                        tracing::warn!(
                            "no JetStream acks through this NATS server; trying another"
                        );
                        if let Err(e) = bus.client.force_reconnect().await {
                            tracing::warn!(error = %e, "NATS reconnect request failed");
                        }
                    }
                    let backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(backoff.delay(failures)) => {}
                    }
                }
            }
        }
        match tokio::time::timeout(drain_timeout, drain(&db, &bus, &config)).await {
            Ok(Ok(n)) => tracing::info!(published = n, "outbox flushed on shutdown"),
            Ok(Err(e)) => tracing::warn!(
                error = format!("{e:#}"),
                "outbox flush on shutdown failed; the rows stay for the next start"
            ),
            Err(_) => tracing::warn!(
                "outbox flush on shutdown timed out; the rows stay for the next start"
            ),
        }
    }
}

/// How often the outbox backlog is measured for the metrics.
const BACKLOG_SAMPLE: Duration = Duration::from_secs(2);

async fn sample_backlog(db: &Db, service: &str) {
    let sample = db
        .read(|c| Ok::<_, DbError>((outbox::backlog(c)?, outbox::poisoned_count(c)?)))
        .await;
    if let Ok(((count, oldest), poisoned)) = sample {
        let l = gpualloc_telemetry::labels([("service", service)]);
        let m = &gpualloc_telemetry::METRICS;
        m.outbox_backlog.get_or_create(&l).set(count);
        let age = oldest.map_or(0.0, |t| (now_micros() - t).max(0) as f64 / 1e6);
        m.outbox_oldest_age.get_or_create(&l).set(age);
        m.outbox_poison.get_or_create(&l).set(poisoned);
    }
}

/// Publishes every pending row; returns how many were published.
pub async fn drain(db: &Db, bus: &Bus, config: &RelayConfig) -> anyhow::Result<usize> {
    let mut total = 0;
    loop {
        let origin = config.origin.clone();
        let grace = i64::try_from(config.foreign_grace.as_micros()).unwrap_or(i64::MAX);
        let batch = config.batch;
        let rows = db
            .read_short(move |c| {
                Ok::<_, DbError>(outbox::pending(c, &origin, now_micros() - grace, batch)?)
            })
            .await?;
        if rows.is_empty() {
            return Ok(total);
        }
        let full = rows.len() as i64 == batch;
        let published = publish(bus, &rows).await;
        let ok = published.ids.len();
        if ok > 0 {
            let ids = published.ids;
            db.write(move |c| Ok::<_, DbError>(outbox::mark_published(c, &ids, now_micros())?))
                .await?;
            total += ok;
            gpualloc_telemetry::METRICS
                .outbox_published
                .get_or_create(&gpualloc_telemetry::labels([("service", &config.service)]))
                .inc_by(ok as u64);
        }
        if let Some((id, why)) = published.row_failure {
            // This row, not the broker, is the problem (too large, refused
            // by the stream): after a few tries it is set aside so that
            // the rows behind it go out.
            let reason = why.clone();
            let set_aside = db
                .write(move |c| {
                    Ok::<_, DbError>(outbox::record_failure(c, id, &reason, now_micros())?)
                })
                .await?;
            if set_aside {
                tracing::error!(
                    service = %config.service,
                    outbox_id = id,
                    error = %why,
                    "outbox row set aside after {} failed publishes; see `outbox --poisoned`",
                    outbox::MAX_ATTEMPTS
                );
                sample_backlog(db, &config.service).await;
                continue;
            }
        }
        if let Some(e) = published.error {
            return Err(e);
        }
        if !full {
            return Ok(total);
        }
    }
}

struct Published {
    /// Rows acknowledged by JetStream, a prefix of the batch.
    ids: Vec<i64>,
    error: Option<anyhow::Error>,
    /// The row whose own content failed (not the broker's state), and why.
    row_failure: Option<(i64, String)>,
}

/// Whether a publish failed because of the message itself — larger than
/// the server or the stream takes — so that retrying it unchanged cannot
/// succeed, unlike a broker that is down, slow or full.
fn row_specific(e: &async_nats::jetstream::context::PublishError) -> bool {
    use async_nats::jetstream::{ErrorCode, context::PublishErrorKind as K};
    match e.kind() {
        K::MaxPayloadExceeded => true,
        K::Other => std::error::Error::source(e)
            .and_then(|s| s.downcast_ref::<async_nats::jetstream::Error>())
            .is_some_and(|j| {
                matches!(
                    j.error_code(),
                    ErrorCode::STREAM_MESSAGE_EXCEEDS_MAXIMUM
                        | ErrorCode::STREAM_HEADER_EXCEEDS_MAXIMUM
                )
            }),
        _ => false,
    }
}

/// Sends the whole batch pipelined, then awaits the acks in order. Stops
/// at the first failure so that rows are marked in commit order only.
async fn publish(bus: &Bus, rows: &[outbox::PendingRow]) -> Published {
    let mut acks: Vec<(i64, PublishAckFuture)> = Vec::with_capacity(rows.len());
    let mut error = None;
    let mut row_failure = None;
    for row in rows {
        // The producer span of this hop: a child of the context stored with
        // the row (the RPC or consumer that wrote it), and the parent of
        // the consumers' spans.
        let inbound = row.header_map();
        let span = tracing::info_span!(
            "publish",
            otel.name = %format!("{} publish", row.subject),
            otel.kind = "producer",
            messaging.system = "nats",
            messaging.operation.type = "send",
            messaging.operation.name = "publish",
            messaging.destination.name = %bus.subject(&row.subject),
            messaging.message.id = %row.event_id,
            trace_id = tracing::field::Empty,
            span_id = tracing::field::Empty,
        );
        gpualloc_telemetry::trace::adopt(&span, gpualloc_telemetry::trace::extract(&inbound));
        let mut headers = HeaderMap::new();
        for (k, v) in gpualloc_telemetry::trace::outgoing(&span, &inbound) {
            headers.insert(k.as_str(), v.as_str());
        }
        let message = async_nats::jetstream::message::PublishMessage::build()
            .payload(Bytes::from(row.payload.clone()))
            .headers(headers)
            .message_id(&row.event_id);
        match bus
            .js
            .send_publish(bus.subject(&row.subject), message)
            .await
        {
            Ok(ack) => acks.push((row.id, ack)),
            Err(e) => {
                if row_specific(&e) {
                    row_failure = Some((row.id, e.to_string()));
                }
                error = Some(
                    anyhow::Error::from_boxed(Box::new(e)).context("publishing an outbox row"),
                );
                break;
            }
        }
    }
    let mut ids = Vec::with_capacity(acks.len());
    for (id, ack) in acks {
        match ack.await {
            Ok(_) => ids.push(id),
            Err(e) => {
                if row_failure.is_none() && row_specific(&e) {
                    row_failure = Some((id, e.to_string()));
                }
                error.get_or_insert(
                    anyhow::Error::from_boxed(Box::new(e)).context("awaiting a JetStream ack"),
                );
                break;
            }
        }
    }
    Published {
        ids,
        error,
        row_failure,
    }
}
