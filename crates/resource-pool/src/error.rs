use std::collections::HashMap;

use gpualloc_domain::Violations;
use gpualloc_platform::status;
use gpualloc_storage::{DbError, TxError, diesel::result::Error as DieselError};
use tonic::Status;

/// Everything the resource-pool service can fail with; mapped to gRPC
/// statuses in one place below.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {0}")]
    Invalid(Violations),
    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },
    /// A refused change; `reason` is the ErrorInfo reason.
    #[error("{message}")]
    Precondition {
        reason: &'static str,
        message: String,
        metadata: HashMap<String, String>,
    },
    #[error("{0}")]
    Denied(Status),
    /// A counter update that the checks said would fit did not: a bug, never
    /// a client error. The transaction rolls back.
    #[error("invariant violated: {0}")]
    Invariant(String),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Query(#[from] DieselError),
}

impl TxError for Error {
    fn is_retryable(&self) -> bool {
        match self {
            Error::Db(e) => e.is_retryable(),
            Error::Query(e) => gpualloc_storage::is_retryable(e),
            _ => false,
        }
    }
}

impl From<Error> for Status {
    fn from(e: Error) -> Status {
        match e {
            Error::Invalid(v) => status::invalid_argument(&v),
            Error::NotFound { kind, id } => status::not_found(kind, &id),
            Error::Precondition {
                reason,
                message,
                metadata,
            } => status::failed_precondition(reason, message, metadata),
            Error::Denied(s) => s,
            Error::Invariant(m) => status::internal("invariant violated", &m),
            Error::Db(e) => status::database(&e),
            Error::Query(e) => status::query(&e),
        }
    }
}

impl From<Status> for Error {
    fn from(s: Status) -> Self {
        Error::Denied(s)
    }
}
