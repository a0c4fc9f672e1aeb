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

/// `2026-11-22T10:04:05Z` (UTC, seconds).
pub fn rfc3339(micros: i64) -> String {
    let secs = micros.div_euclid(1_000_000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The civil date of a day count since 1970-01-01 (Howard Hinnant).
pub fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_utc_times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        // 2024-02-29T23:59:59Z, a leap day.
        assert_eq!(rfc3339(1_709_251_199_000_000), "2024-02-29T23:59:59Z");
        assert_eq!(rfc3339(1_709_251_200_000_000), "2024-03-01T00:00:00Z");
    }

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
