use std::collections::HashMap;

use gpualloc_domain::{State, Violations};
use gpualloc_platform::status;
use gpualloc_storage::{DbError, TxError, diesel::result::Error as DieselError};
use tonic::Status;

/// Everything the allocation service can fail with; mapped to gRPC
/// statuses in one place below.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid request: {0}")]
    Invalid(Violations),
    #[error("allocation {0:?} not found")]
    NotFound(String),
    #[error("allocation {id} is {state}: {action} is not possible")]
    WrongState {
        id: String,
        state: State,
        action: &'static str,
    },
    #[error("allocation {0} was granted without a lease: there is nothing to renew")]
    NoLease(String),
    #[error("request_id {0:?} was already used with different parameters")]
    IdempotencyKeyReused(String),
    /// The quota check refused the request (reason EXCEEDS_QUOTA or
    /// UNSATISFIABLE); nothing was stored.
    #[error("{message}")]
    Quota {
        reason: &'static str,
        message: String,
        violations: Vec<(String, String)>,
    },
    /// Someone else changed the allocation between our read and write; the
    /// transaction is retried.
    #[error("allocation {0} changed concurrently")]
    Conflict(String),
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
            Error::Conflict(_) => true,
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
            Error::NotFound(id) => status::not_found("allocation", &id),
            Error::WrongState { ref id, state, .. } => status::failed_precondition(
                "WRONG_STATE",
                e.to_string(),
                HashMap::from([
                    ("allocation_id".into(), id.clone()),
                    ("state".into(), state.to_string()),
                ]),
            ),
            Error::NoLease(ref id) => status::failed_precondition(
                "NO_LEASE",
                e.to_string(),
                HashMap::from([("allocation_id".into(), id.clone())]),
            ),
            Error::IdempotencyKeyReused(ref id) => status::failed_precondition(
                "IDEMPOTENCY_KEY_REUSED",
                e.to_string(),
                HashMap::from([("request_id".into(), id.clone())]),
            ),
            Error::Quota {
                reason,
                message,
                violations,
            } => status::quota_failure(reason, message, violations, HashMap::new()),
            Error::Conflict(id) => {
                Status::aborted(format!("allocation {id} changed concurrently; retry"))
            }
            Error::Invariant(m) => status::internal("invariant violated", &m),
            Error::Db(e) => status::database(&e),
            Error::Query(e) => status::query(&e),
        }
    }
}
