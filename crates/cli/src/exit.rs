//! Failures as one readable line plus their details, and exit codes by
//! gRPC status class, so scripts can tell "not found" from "over quota"
//! from "the mesh is down" without parsing text.

use std::process::ExitCode;

use tonic::{Code, Status};
use tonic_types::StatusExt;

/// Exit codes (also in `gpualloc --help`).
pub mod codes {
    pub const OTHER: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const INVALID: u8 = 3;
    pub const NOT_FOUND: u8 = 4;
    pub const CONFLICT: u8 = 5;
    pub const PERMISSION_DENIED: u8 = 6;
    pub const UNAUTHENTICATED: u8 = 7;
    pub const FAILED_PRECONDITION: u8 = 8;
    pub const EXHAUSTED: u8 = 9;
    pub const UNAVAILABLE: u8 = 10;
    /// `--wait` saw the allocation end without being granted.
    pub const NOT_GRANTED: u8 = 11;
    pub const INTERRUPTED: u8 = 130;
}

/// Why a command failed.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
    pub details: Vec<String>,
}

impl Failure {
    pub fn other(message: impl Into<String>) -> Failure {
        Failure {
            code: codes::OTHER,
            message: message.into(),
            details: Vec::new(),
        }
    }

    pub fn usage(message: impl Into<String>) -> Failure {
        Failure {
            code: codes::USAGE,
            message: message.into(),
            details: Vec::new(),
        }
    }

    pub fn code(&self) -> ExitCode {
        ExitCode::from(self.code)
    }

    /// Writes the failure to stderr: `error: …` and one indented line per
    /// detail.
    pub fn report(&self) {
        eprintln!("error: {}", self.message);
        for d in &self.details {
            eprintln!("  {d}");
        }
    }
}

/// The exit code of a gRPC status.
pub fn code_of(code: Code) -> u8 {
    match code {
        Code::Ok => 0,
        Code::InvalidArgument | Code::OutOfRange => codes::INVALID,
        Code::NotFound => codes::NOT_FOUND,
        Code::AlreadyExists | Code::Aborted => codes::CONFLICT,
        Code::PermissionDenied => codes::PERMISSION_DENIED,
        Code::Unauthenticated => codes::UNAUTHENTICATED,
        Code::FailedPrecondition => codes::FAILED_PRECONDITION,
        Code::ResourceExhausted => codes::EXHAUSTED,
        Code::Unavailable | Code::DeadlineExceeded => codes::UNAVAILABLE,
        _ => codes::OTHER,
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::Unauthenticated => "UNAUTHENTICATED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::Unavailable => "UNAVAILABLE",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Internal => "INTERNAL",
        _ => "UNKNOWN",
    }
}

impl From<Status> for Failure {
    fn from(s: Status) -> Failure {
        let mut details = Vec::new();
        let d = s.get_error_details();
        if let Some(q) = d.quota_failure() {
            for v in &q.violations {
                details.push(format!("quota {}: {}", v.subject, v.description));
            }
        }
        if let Some(b) = d.bad_request() {
            for v in &b.field_violations {
                details.push(format!("{}: {}", v.field, v.description));
            }
        }
        if let Some(p) = d.precondition_failure() {
            for v in &p.violations {
                details.push(format!("precondition {} ({})", v.r#type, v.subject));
            }
        }
        if let Some(r) = d.retry_info()
            && let Some(delay) = r.retry_delay
        {
            details.push(format!("retry after {:.1}s", delay.as_secs_f64()));
        }
        if let Some(i) = d.error_info()
            && !i.reason.is_empty()
        {
            details.push(format!("reason {}", i.reason));
        }
        Failure {
            code: code_of(s.code()),
            message: format!("{}: {}", code_name(s.code()), s.message()),
            details,
        }
    }
}

impl From<tonic::transport::Error> for Failure {
    fn from(e: tonic::transport::Error) -> Failure {
        Failure {
            code: codes::UNAVAILABLE,
            message: format!("cannot connect: {e}"),
            details: Vec::new(),
        }
    }
}
