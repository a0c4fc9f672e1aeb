use gpualloc_domain::Violations;
use gpualloc_platform::status;
use gpualloc_storage::{DbError, TxError, diesel::result::Error as DieselError};
use tonic::Status;

/// Everything the viewer can fail with; mapped to gRPC statuses below.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {0}")]
    Invalid(Violations),
    #[error("{kind} {id:?} not found")]
    NotFound { kind: &'static str, id: String },
    #[error("event cannot be projected: {0}")]
    BadEvent(String),
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
            Error::BadEvent(m) => status::internal("bad event", &m),
            Error::Db(e) => status::database(&e),
            Error::Query(e) => status::query(&e),
        }
    }
}
