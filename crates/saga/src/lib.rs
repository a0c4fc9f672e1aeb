//! The allocation saga's delivery machinery, shared by every service:
//!
//! - [`Bus`]: the NATS connection and the JetStream stream, provisioned
//!   idempotently at start-up;
//! - [`Emitter`]: builds [`Event`]s and stages them as outbox rows in the
//!   caller's transaction;
//! - [`Outbox`]: the unit of work every writer uses — a transaction, its
//!   events, the commit, and a nudge to the relay;
//! - [`relay`]: publishes outbox rows with `Nats-Msg-Id` = event id and marks
//!   them published only after JetStream's ack;
//! - [`consumer`]: durable pull consumers that apply a batch of events in one
//!   transaction, record each event id in the inbox, and ack after commit.
//!
//! Together these make every effect happen once although delivery is
//! at-least-once (docs/architecture.md, "Delivery rules").

mod bus;
pub mod consumer;
mod emit;
pub mod relay;
pub mod subjects;
mod unit;

pub use bus::{Bus, BusConfig, NatsAuth};
pub use consumer::{
    Consumer, ConsumerSpec, Delivery, Handler, MAX_PARKED, MAX_VERSION_JUMP, Outcome, version_gate,
};
pub use emit::{Emitter, TRACE_HEADERS, decode};
pub use gpualloc_proto::events::v1::{Event, event::Payload};
pub use relay::{Relay, RelayConfig};
pub use unit::Outbox;
