//! Identifiers clients send and see: tenants, pools and GPU models (DNS
//! labels), custom classes, and allocation ids (UUID v7), each parsed once
//! with a message that says what was wrong.

use std::{fmt, str::FromStr};

use serde::{Deserialize, Serialize};

fn dns_label(kind: &str, s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    if ok {
        Ok(())
    } else if s.is_empty() {
        Err(format!("{kind} is required"))
    } else {
        Err(format!(
            "{kind} {} must be 1-63 lower-case letters, digits or '-', not starting or ending with '-'",
            crate::shown(s)
        ))
    }
}

fn name(kind: &str, s: &str, first_letter_only: bool) -> Result<(), String> {
    let first_ok = s.bytes().next().is_some_and(|b| {
        if first_letter_only {
            b.is_ascii_alphabetic()
        } else {
            b.is_ascii_alphanumeric()
        }
    });
    let ok = first_ok
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-' || b == b'.');
    if ok {
        Ok(())
    } else {
        let first = if first_letter_only {
            "a letter"
        } else {
            "a letter or digit"
        };
        Err(format!(
            "{kind} {} must be 1-63 letters, digits, '_', '-' or '.', starting with {first}",
            crate::shown(s)
        ))
    }
}

macro_rules! string_id {
    ($(#[$doc:meta])* $name:ident, $check:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
        #[serde(try_from = "String", into = "String")]
        pub struct $name(String);

        impl $name {
            /// Parses and validates; the error is a description for a field
            /// violation.
            pub fn parse(s: impl Into<String>) -> Result<Self, String> {
                let s = s.into();
                let check: fn(&str) -> Result<(), String> = $check;
                check(&s)?;
                Ok(Self(s))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                Self::parse(s)
            }
        }

        impl TryFrom<String> for $name {
            type Error = String;
            fn try_from(s: String) -> Result<Self, String> {
                Self::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(id: $name) -> String {
                id.0
            }
        }
    };
}

string_id!(
    /// A tenant: a DNS label, like a Kubernetes namespace.
    TenantId,
    |s| dns_label("tenant", s)
);
string_id!(
    /// A pool: a DNS label.
    PoolId,
    |s| dns_label("pool_id", s)
);
string_id!(
    /// A GPU model such as `A100` or `H100-80GB`.
    GpuModel,
    |s| name("gpu_model", s, false)
);
string_id!(
    /// An operator-defined resource class such as `SEAT` or `licence.matlab`.
    CustomClass,
    |s| name("custom class", s, true)
);

/// An allocation id: a UUID (v7, so ids sort by creation time).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AllocationId(uuid::Uuid);

impl AllocationId {
    pub fn new() -> Self {
        Self(uuid::Uuid::now_v7())
    }

    pub fn parse(s: &str) -> Result<Self, String> {
        if s.is_empty() {
            return Err("allocation_id is required".into());
        }
        uuid::Uuid::try_parse(s)
            .map(Self)
            .map_err(|_| format!("allocation_id {} is not a UUID", crate::shown(s)))
    }
}

impl Default for AllocationId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for AllocationId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.hyphenated().fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_ids_are_dns_labels() {
        assert!(TenantId::parse("team-a1").is_ok());
        for bad in ["", "Team", "-a", "a-", "a_b", &"x".repeat(64)] {
            assert!(TenantId::parse(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn custom_classes_start_with_a_letter() {
        assert!(CustomClass::parse("SEAT").is_ok());
        assert!(CustomClass::parse("licence.matlab").is_ok());
        assert!(CustomClass::parse("1seat").is_err());
        assert!(CustomClass::parse("se at").is_err());
    }

    #[test]
    fn allocation_ids_round_trip() {
        let id = AllocationId::new();
        assert_eq!(AllocationId::parse(&id.to_string()), Ok(id));
        assert!(AllocationId::parse("nope").is_err());
    }
}
