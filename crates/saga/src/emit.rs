//! `Emitter`: builds events (ids, versions, trace context) and stages them
//! as outbox rows in the current transaction; `decode` reads one back.

use std::collections::BTreeMap;

use gpualloc_domain::time;
use gpualloc_storage::{DbConnection, diesel::QueryResult, outbox};
use prost::Message;

use crate::{Event, Payload, subjects};

pub use gpualloc_telemetry::trace::TRACE_HEADERS;

/// Builds events and stages them for the outbox of the current transaction.
/// Create one per transaction attempt, call [`Emitter::emit`] for each event,
/// then [`Emitter::flush`] before committing.
#[derive(Debug)]
pub struct Emitter {
    origin: String,
    now: i64,
    headers: BTreeMap<String, String>,
    staged: Vec<outbox::OutboxMessage>,
    events: Vec<Event>,
}

impl Emitter {
    /// `origin` is this replica's id; `headers` the trace context to pass on.
    pub fn new(origin: &str, now: i64, headers: BTreeMap<String, String>) -> Self {
        Self {
            origin: origin.to_owned(),
            now,
            headers,
            staged: Vec::new(),
            events: Vec::new(),
        }
    }

    pub fn now(&self) -> i64 {
        self.now
    }

    pub fn headers(&self) -> &BTreeMap<String, String> {
        &self.headers
    }

    /// The trace context of the events emitted from now on (a consumer
    /// applies several events, each with its own, in one transaction).
    pub fn set_headers(&mut self, headers: BTreeMap<String, String>) {
        self.headers = headers;
    }

    /// A point to come back to with [`Emitter::discard_since`].
    pub fn mark(&self) -> usize {
        self.staged.len()
    }

    /// Drops what was emitted since `mark` (the work that emitted it was
    /// not applied after all).
    pub fn discard_since(&mut self, mark: usize) {
        self.staged.truncate(mark);
        self.events.truncate(mark);
    }

    /// Stages one event about `aggregate_id` (an allocation id, pool id or
    /// tenant) and returns it.
    pub fn emit(
        &mut self,
        allocation_id: &str,
        tenant: &str,
        aggregate_version: i64,
        payload: Payload,
    ) -> &Event {
        let subject = subjects::of(&payload);
        let event = Event {
            event_id: uuid::Uuid::now_v7().to_string(),
            allocation_id: allocation_id.to_owned(),
            tenant: tenant.to_owned(),
            aggregate_version,
            event_time: Some(time::to_timestamp(self.now)),
            payload: Some(payload),
        };
        let aggregate_id = match &event.payload {
            _ if !allocation_id.is_empty() => allocation_id.to_owned(),
            Some(Payload::PoolChanged(p)) => {
                format!(
                    "pool:{}",
                    p.pool.as_ref().map(|p| p.pool_id.as_str()).unwrap_or("")
                )
            }
            _ => format!("tenant:{tenant}"),
        };
        self.staged.push(outbox::OutboxMessage {
            event_id: event.event_id.clone(),
            subject: subject.to_owned(),
            payload: event.encode_to_vec(),
            headers: self.headers.clone(),
            aggregate_id,
        });
        self.events.push(event);
        self.events.last().expect("just pushed")
    }

    /// Events staged so far.
    pub fn events(&self) -> &[Event] {
        &self.events
    }

    pub fn is_empty(&self) -> bool {
        self.staged.is_empty()
    }

    /// Writes the staged events to the outbox in the caller's transaction.
    pub fn flush(&mut self, conn: &mut DbConnection) -> QueryResult<()> {
        let staged = std::mem::take(&mut self.staged);
        outbox::append(conn, &self.origin, self.now, &staged)
    }
}

/// Decodes a message payload into an [`Event`] that has a payload.
pub fn decode(bytes: &[u8]) -> Result<Event, String> {
    let event = Event::decode(bytes).map_err(|e| format!("undecodable event: {e}"))?;
    if event.event_id.is_empty() {
        return Err("event without event_id".into());
    }
    if event.payload.is_none() {
        return Err(format!("event {} has no (known) payload", event.event_id));
    }
    Ok(event)
}
