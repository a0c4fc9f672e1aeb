//! Storage errors, and how to read them: which are worth retrying on a
//! new transaction and which mean the database is not there.

use diesel::result::{DatabaseErrorKind, Error as DieselError};

/// Errors of the storage layer itself (connecting, pooling, migrating).
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("cannot connect to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: diesel::ConnectionError,
    },
    #[error("database connection pool: {0}")]
    Pool(String),
    #[error("database task panicked: {0}")]
    Panic(String),
    #[error("migration {version} failed: {source}")]
    Migration {
        version: String,
        #[source]
        source: DieselError,
    },
    #[error(transparent)]
    Query(#[from] DieselError),
}

impl DbError {
    /// Whether the database was not there (see [`is_unavailable`]).
    pub fn is_unavailable(&self) -> bool {
        match self {
            DbError::Connect { .. } | DbError::Pool(_) => true,
            DbError::Query(e) => is_unavailable(e),
            _ => false,
        }
    }
}

/// Whether the database was not there rather than refusing the statement:
/// a lost, refused or terminated connection, a server starting up or
/// shutting down. The caller should try again later (`UNAVAILABLE`); it is
/// not a bug to report.
pub fn is_unavailable(e: &DieselError) -> bool {
    match e {
        DieselError::DatabaseError(
            DatabaseErrorKind::ClosedConnection | DatabaseErrorKind::UnableToSendCommand,
            _,
        ) => true,
        DieselError::DatabaseError(_, info) => {
            let m = info.message();
            [
                "terminating connection",
                "server closed the connection",
                "connection to server",
                "the database system is",
                "Connection refused",
                "could not connect",
            ]
            .iter()
            .any(|p| m.contains(p))
        }
        DieselError::BrokenTransactionManager => true,
        DieselError::QueryBuilderError(inner) => inner
            .downcast_ref::<DbError>()
            .is_some_and(DbError::is_unavailable),
        _ => false,
    }
}

/// What a transaction closure may fail with. Retryable errors (lost
/// optimistic races, serialisation failures, a locked SQLite file) make
/// [`crate::Db::write`] run the closure again on a fresh transaction.
pub trait TxError: From<DieselError> + From<DbError> + Send + 'static {
    fn is_retryable(&self) -> bool {
        false
    }
}

impl TxError for DbError {
    fn is_retryable(&self) -> bool {
        matches!(self, DbError::Query(e) if is_retryable(e))
    }
}

impl TxError for DieselError {
    fn is_retryable(&self) -> bool {
        is_retryable(self)
    }
}

impl From<DbError> for DieselError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::Query(e) => e,
            other => DieselError::QueryBuilderError(Box::new(other)),
        }
    }
}

/// Errors worth retrying on a new transaction: PostgreSQL serialisation
/// failures and deadlocks, SQLite's "database is locked", and unique
/// violations from concurrent inserts of the same key (bounded by the
/// retry budget of [`crate::Db::write`], so a deterministic one still
/// surfaces).
pub fn is_retryable(e: &DieselError) -> bool {
    match e {
        DieselError::DatabaseError(DatabaseErrorKind::SerializationFailure, _) => true,
        // Two transactions inserting the same key at once (a lock row, an
        // inbox claim, a first projection of a view, an idempotency key):
        // the loser runs again, now sees the winner's row and takes the
        // path for an existing one.
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, _) => true,
        DieselError::DatabaseError(_, info) => {
            let m = info.message();
            m.contains("deadlock detected") || m.contains("database is locked")
        }
        _ => false,
    }
}
