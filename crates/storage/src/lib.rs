//! Persistence shared by the three services: one diesel query codebase for
//! SQLite (the embedded default) and PostgreSQL (production), selected at run
//! time by the database URL.
//!
//! It provides the [`DbConnection`] enum (`#[derive(MultiConnection)]`), a
//! [`Db`] handle that runs transactions on the blocking pool, portable
//! embedded migrations ([`Migration`]), and the two tables every saga
//! participant needs: the transactional [`outbox`] and the consumer
//! [`inbox`]. Each service owns its database; nothing here is shared at run
//! time.

mod conn;
mod db;
mod error;
mod group;
pub mod inbox;
mod limit;
pub mod lock;
mod migrate;
mod native;
pub mod outbox;
mod update;

pub use conn::{DbConnection, MultiBackend};
pub use db::{Backend, Db, DbOptions, redact_url};
pub use error::{DbError, TxError, is_retryable, is_unavailable};
pub use limit::{LiteralLimitExt, WithLiteralLimit};
pub use migrate::Migration;
pub use native::Native;
pub use update::{CachedUpdate, update_cached};

/// Migrations of the tables defined here (outbox, inbox, locks). Every
/// service applies them before its own.
pub const MIGRATIONS: &[Migration] = &[
    Migration {
        version: "storage_0001_outbox_inbox",
        up: include_str!("../migrations/0001_outbox_inbox.sql"),
    },
    Migration {
        version: "storage_0002_outbox_poison",
        up: include_str!("../migrations/0002_outbox_poison.sql"),
    },
];

/// Re-exported so that services build queries against the same diesel.
pub use diesel;

/// The wait before retrying a transaction that lost a race (a busy
/// SQLite, a PostgreSQL serialization failure): 4 ms, doubling up to
/// 128 ms.
const TX_RETRY: gpualloc_domain::Backoff = gpualloc_domain::Backoff::new(
    std::time::Duration::from_millis(4),
    std::time::Duration::from_millis(128),
);
