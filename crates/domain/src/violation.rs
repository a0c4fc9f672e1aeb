//! Field violations: every problem found while parsing a request, reported
//! at once in the shape of `google.rpc.BadRequest`, with client input
//! echoed quoted and cut short.

use std::fmt;

/// One problem with one field of a request, in the shape of
/// `google.rpc.BadRequest.FieldViolation`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Path of the field, e.g. `resources.custom[SEAT]`.
    pub field: String,
    /// What is wrong, for people.
    pub description: String,
}

/// Every problem found while parsing a request: clients get them all at once
/// rather than one per round trip.
#[derive(Clone, Debug, Default, PartialEq, Eq, thiserror::Error)]
pub struct Violations(pub Vec<Violation>);

impl Violations {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn single(field: impl Into<String>, description: impl Into<String>) -> Self {
        let mut v = Self::new();
        v.add(field, description);
        v
    }

    pub fn add(&mut self, field: impl Into<String>, description: impl Into<String>) {
        self.0.push(Violation {
            field: field.into(),
            description: description.into(),
        });
    }

    /// Moves every violation of `other` under `prefix` (`cpu_millis` becomes
    /// `resources.cpu_millis`).
    pub fn extend_prefixed(&mut self, prefix: &str, other: Violations) {
        for v in other.0 {
            let field = if v.field.is_empty() {
                prefix.to_owned()
            } else if v.field.starts_with('[') {
                format!("{prefix}{}", v.field)
            } else {
                format!("{prefix}.{}", v.field)
            };
            self.0.push(Violation {
                field,
                description: v.description,
            });
        }
    }

    /// Records the error of `result` under `field` and returns its value.
    pub fn check<T>(&mut self, field: &str, result: Result<T, String>) -> Option<T> {
        match result {
            Ok(v) => Some(v),
            Err(description) => {
                self.add(field, description);
                None
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(value)` when nothing was found, else every violation.
    pub fn into_result<T>(self, value: impl FnOnce() -> T) -> Result<T, Violations> {
        if self.0.is_empty() {
            Ok(value())
        } else {
            Err(self)
        }
    }
}

/// Violations a message names; the rest are counted (the message travels
/// in a header, which must stay small whatever the request held).
pub const MESSAGE_VIOLATIONS: usize = 3;

impl fmt::Display for Violations {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, v) in self.0.iter().take(MESSAGE_VIOLATIONS).enumerate() {
            if i > 0 {
                f.write_str("; ")?;
            }
            write!(f, "{}: {}", v.field, v.description)?;
        }
        if self.0.len() > MESSAGE_VIOLATIONS {
            write!(f, "; and {} more", self.0.len() - MESSAGE_VIOLATIONS)?;
        }
        Ok(())
    }
}

/// Longest piece of a client's input that an error message repeats.
pub const ECHO_MAX: usize = 128;

/// `input` as an error message repeats it: quoted, and cut at
/// [`ECHO_MAX`] characters (a megabyte of garbage must not come back
/// doubled, nor fill the logs).
pub fn shown(input: &str) -> String {
    match input.char_indices().nth(ECHO_MAX) {
        None => format!("{input:?}"),
        Some((i, _)) => format!("{:?}… ({} bytes)", &input[..i], input.len()),
    }
}

#[cfg(test)]
mod echo_tests {
    use super::*;

    #[test]
    fn long_input_is_cut() {
        assert_eq!(shown("ab"), "\"ab\"");
        let long = "x".repeat(10_000);
        let s = shown(&long);
        assert!(s.len() < 200, "{s}");
        assert!(s.ends_with("(10000 bytes)"));
    }
}
