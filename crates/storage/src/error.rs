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
/// failures and deadlocks, SQLite's "database is locked", and two replicas
/// creating the same lock row at once ([`crate::lock::acquire`]).
pub fn is_retryable(e: &DieselError) -> bool {
    match e {
        DieselError::DatabaseError(DatabaseErrorKind::SerializationFailure, _) => true,
        DieselError::DatabaseError(DatabaseErrorKind::UniqueViolation, info) => {
            info.table_name() == Some("saga_locks")
                || info.constraint_name() == Some("saga_locks_pkey")
                || info.message().contains("saga_locks.name")
        }
        DieselError::DatabaseError(_, info) => {
            let m = info.message();
            m.contains("deadlock detected") || m.contains("database is locked")
        }
        _ => false,
    }
}
