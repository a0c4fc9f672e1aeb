//! Builders for the gRPC statuses clients see, with `google.rpc` details so
//! that programs need not parse messages: BadRequest field violations,
//! ErrorInfo reasons, QuotaFailure, RetryInfo.

use std::collections::HashMap;

use gpualloc_domain::Violations;
use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, PreconditionViolation, QuotaViolation, StatusExt};

/// The ErrorInfo domain of every gpualloc error.
pub const DOMAIN: &str = "gpualloc.dev";

/// Whether `status` was made by the client's own transport (its source
/// chain holds a transport or I/O error) rather than sent by a server.
/// Such a status can carry any code: a broken connection surfaces as
/// CANCELLED or UNKNOWN, and tonic maps an HTTP/2 error by its reason, so a
/// stream refused by the server's GOAWAY (NO_ERROR) arrives as INTERNAL.
pub fn from_transport(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(e) = source {
        if e.is::<tonic::transport::Error>() || e.is::<std::io::Error>() {
            return true;
        }
        source = e.source();
    }
    false
}

/// Field violations a status carries at most, and the bytes their text
/// may take: details travel base64-encoded in a trailer, which an HTTP/2
/// peer refuses past its header size limit (16 KiB for tonic's clients),
/// and the client would then see INTERNAL instead of the violations.
pub const MAX_FIELD_VIOLATIONS: usize = 20;
pub const MAX_DETAILS_BYTES: usize = 6 * 1024;

/// INVALID_ARGUMENT listing the field violations (as many as fit
/// [`MAX_FIELD_VIOLATIONS`] and [`MAX_DETAILS_BYTES`]; the message says how
/// many there were).
pub fn invalid_argument(v: &Violations) -> Status {
    let mut budget = MAX_DETAILS_BYTES;
    let violations: Vec<FieldViolation> =
        v.0.iter()
            .take(MAX_FIELD_VIOLATIONS)
            .map(|v| {
                FieldViolation::new(
                    gpualloc_auth::truncate(&v.field, 100),
                    gpualloc_auth::truncate(&v.description, 200),
                )
            })
            .take_while(|f| {
                let size = f.field.len() + f.description.len() + 8;
                let fits = size <= budget;
                budget = budget.saturating_sub(size);
                fits
            })
            .collect();
    Status::with_error_details(
        Code::InvalidArgument,
        gpualloc_auth::truncate(&format!("invalid request: {v}"), 1000),
        ErrorDetails::with_bad_request(violations),
    )
}

/// INVALID_ARGUMENT for one field.
pub fn invalid_field(field: &str, description: impl Into<String>) -> Status {
    invalid_argument(&Violations::single(field, description))
}

/// NOT_FOUND with the resource named in ResourceInfo.
pub fn not_found(resource_type: &str, name: &str) -> Status {
    Status::with_error_details(
        Code::NotFound,
        format!("{resource_type} {name:?} not found"),
        ErrorDetails::with_resource_info(resource_type, name, "", ""),
    )
}

/// FAILED_PRECONDITION with an ErrorInfo `reason` (UPPER_SNAKE_CASE) that
/// programs can branch on.
/// A PreconditionFailure names the same reason as its `type` and what the
/// precondition is about (`pool_id:gpu-h100`) as its subject (AIP-193).
pub fn failed_precondition(
    reason: &str,
    message: impl Into<String>,
    metadata: HashMap<String, String>,
) -> Status {
    let message = message.into();
    let mut about: Vec<String> = metadata.iter().map(|(k, v)| format!("{k}:{v}")).collect();
    about.sort();
    let mut details = ErrorDetails::with_error_info(reason, DOMAIN, metadata);
    details.set_precondition_failure(vec![PreconditionViolation::new(
        reason,
        about.join(","),
        message.clone(),
    )]);
    Status::with_error_details(Code::FailedPrecondition, message, details)
}

/// FAILED_PRECONDITION with QuotaFailure (`subject` = resource class) and
/// ErrorInfo (`reason` = EXCEEDS_QUOTA or UNSATISFIABLE).
pub fn quota_failure(
    reason: &str,
    message: impl Into<String>,
    violations: Vec<(String, String)>,
    metadata: HashMap<String, String>,
) -> Status {
    let mut details = ErrorDetails::with_error_info(reason, DOMAIN, metadata);
    let violations: Vec<QuotaViolation> = violations
        .into_iter()
        .map(|(subject, description)| QuotaViolation::new(subject, description))
        .collect();
    if !violations.is_empty() {
        details.set_quota_failure(violations);
    }
    Status::with_error_details(Code::FailedPrecondition, message, details)
}

/// UNAVAILABLE with a retry hint.
pub fn unavailable(message: impl Into<String>, retry_after: std::time::Duration) -> Status {
    Status::with_error_details(
        Code::Unavailable,
        message,
        ErrorDetails::with_retry_info(Some(retry_after)),
    )
}

/// A storage error as the client sees it: UNAVAILABLE with a retry hint
/// when the database is not there (the replica reports NOT_SERVING
/// meanwhile, and another replica or a retry will do), else INTERNAL.
pub fn database(e: &gpualloc_storage::DbError) -> Status {
    if e.is_unavailable() {
        tracing::warn!(error = %e, "database unavailable");
        return unavailable(
            "database unavailable; retry",
            std::time::Duration::from_secs(1),
        );
    }
    internal("database error", e)
}

/// [`database`] for an error of a query.
pub fn query(e: &gpualloc_storage::diesel::result::Error) -> Status {
    if gpualloc_storage::is_unavailable(e) {
        tracing::warn!(error = %e, "database unavailable");
        return unavailable(
            "database unavailable; retry",
            std::time::Duration::from_secs(1),
        );
    }
    internal("database error", e)
}

/// INTERNAL without leaking details to the client; the error is logged.
pub fn internal(context: &str, error: &dyn std::fmt::Display) -> Status {
    tracing::error!(error = %error, "{context}");
    Status::internal(format!("{context}; see the server log"))
}
