//! Time is stored as microseconds since the Unix epoch (`i64`) in both
//! databases: portable across SQLite and PostgreSQL and cheap to compare.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Longest lease or hold limit accepted.
pub const MAX_DURATION: Duration = Duration::from_secs(366 * 24 * 3600);

pub fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

pub fn to_timestamp(micros: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

pub fn from_timestamp(ts: &prost_types::Timestamp) -> i64 {
    ts.seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(ts.nanos) / 1000)
}

/// Parses a positive duration of at most [`MAX_DURATION`], in microseconds.
pub fn parse_duration(d: &prost_types::Duration) -> Result<i64, String> {
    if d.seconds < 0 || d.nanos < 0 || d.nanos >= 1_000_000_000 {
        return Err("must be a positive duration".into());
    }
    let micros = d
        .seconds
        .saturating_mul(1_000_000)
        .saturating_add(i64::from(d.nanos) / 1000);
    if micros < 1_000_000 {
        return Err("must be at least 1s".into());
    }
    if micros > MAX_DURATION.as_micros() as i64 {
        return Err("must be at most 366 days".into());
    }
    Ok(micros)
}

pub fn to_duration(micros: i64) -> prost_types::Duration {
    prost_types::Duration {
        seconds: micros.div_euclid(1_000_000),
        nanos: i32::try_from(micros.rem_euclid(1_000_000) * 1000).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_round_trip() {
        for m in [0, 1, 1_700_000_000_123_456, -5] {
            assert_eq!(from_timestamp(&to_timestamp(m)), m);
        }
    }

    #[test]
    fn durations_are_bounded() {
        let d = |s, n| prost_types::Duration {
            seconds: s,
            nanos: n,
        };
        assert_eq!(parse_duration(&d(90, 0)), Ok(90_000_000));
        assert!(parse_duration(&d(0, 5)).is_err());
        assert!(parse_duration(&d(-1, 0)).is_err());
        assert!(parse_duration(&d(400 * 86400, 0)).is_err());
        assert_eq!(
            parse_duration(&to_duration(3_600_000_000)),
            Ok(3_600_000_000)
        );
    }
}
