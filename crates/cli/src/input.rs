//! Quantities as people type them — `8` or `500m` cores, `64Gi` of
//! memory, `2Ti` of storage, `2h30m` of lease, `SEAT=3`, `team=ml` — turned
//! into what the API takes. The services check the values again; these
//! parsers only catch typing mistakes early, with the flag's name.

/// CPU: cores (`8`, `0.5`) or millicores (`500m`), as millicores.
pub fn cpu(s: &str) -> Result<i64, String> {
    let s = s.trim();
    if let Some(m) = s.strip_suffix('m') {
        return m
            .parse::<i64>()
            .map_err(|_| format!("{s:?}: cores (8, 0.5) or millicores (500m)"));
    }
    let cores: f64 = s
        .parse()
        .map_err(|_| format!("{s:?}: cores (8, 0.5) or millicores (500m)"))?;
    if !cores.is_finite() || cores < 0.0 {
        return Err(format!("{s:?}: not a number of cores"));
    }
    Ok((cores * 1000.0).round() as i64)
}

/// Memory: `512Mi`, `64Gi`, `1Ti` (or a plain number of MiB), as MiB.
pub fn memory_mib(s: &str) -> Result<i64, String> {
    scaled(s, &[("Mi", 1), ("Gi", 1024), ("Ti", 1024 * 1024)], 1)
        .map_err(|_| format!("{s:?}: memory like 512Mi, 64Gi or 1Ti"))
}

/// Storage: `500Gi`, `2Ti` (or a plain number of GiB), as GiB.
pub fn storage_gib(s: &str) -> Result<i64, String> {
    scaled(s, &[("Gi", 1), ("Ti", 1024), ("Pi", 1024 * 1024)], 1)
        .map_err(|_| format!("{s:?}: storage like 500Gi or 2Ti"))
}

fn scaled(s: &str, units: &[(&str, i64)], plain: i64) -> Result<i64, ()> {
    let s = s.trim();
    for (unit, factor) in units {
        if let Some(n) = s.strip_suffix(unit) {
            return n.trim().parse::<i64>().map(|n| n * factor).map_err(|_| ());
        }
    }
    s.parse::<i64>().map(|n| n * plain).map_err(|_| ())
}

/// A duration: `90s`, `30m`, `2h`, `1d`, `1h30m`, as seconds.
pub fn duration_secs(s: &str) -> Result<i64, String> {
    let err = || format!("{s:?}: a duration like 90s, 30m, 2h, 1d or 1h30m");
    let mut total = 0i64;
    let mut digits = String::new();
    for c in s.trim().chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let n: i64 = digits.parse().map_err(|_| err())?;
        digits.clear();
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(err()),
        };
        total = total
            .checked_add(n.checked_mul(unit).ok_or_else(err)?)
            .ok_or_else(err)?;
    }
    if !digits.is_empty() || total == 0 {
        return Err(err());
    }
    Ok(total)
}

/// `KEY=VALUE`.
pub fn pair(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?}: KEY=VALUE"))
}

/// `CLASS=N` of a custom class.
pub fn custom(s: &str) -> Result<(String, i64), String> {
    let (k, v) = pair(s)?;
    let n = v
        .parse::<i64>()
        .map_err(|_| format!("{s:?}: CLASS=COUNT, e.g. SEAT=3"))?;
    Ok((k, n))
}

pub fn format_cpu(millis: i64) -> String {
    if millis % 1000 == 0 {
        format!("{}cpu", millis / 1000)
    } else {
        format!("{millis}m cpu")
    }
}

pub fn format_mib(mib: i64) -> String {
    if mib % (1024 * 1024) == 0 {
        format!("{}Ti", mib / (1024 * 1024))
    } else if mib % 1024 == 0 {
        format!("{}Gi", mib / 1024)
    } else {
        format!("{mib}Mi")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities_parse_as_people_write_them() {
        assert_eq!(cpu("8"), Ok(8000));
        assert_eq!(cpu("0.5"), Ok(500));
        assert_eq!(cpu("250m"), Ok(250));
        assert!(cpu("lots").is_err());
        assert_eq!(memory_mib("64Gi"), Ok(65536));
        assert_eq!(memory_mib("512Mi"), Ok(512));
        assert_eq!(memory_mib("512"), Ok(512));
        assert_eq!(storage_gib("2Ti"), Ok(2048));
        assert!(storage_gib("2TB").is_err());
        assert_eq!(duration_secs("1h30m"), Ok(5400));
        assert_eq!(duration_secs("2d"), Ok(172_800));
        assert!(duration_secs("2").is_err());
        assert!(duration_secs("0s").is_err());
        assert_eq!(custom("SEAT=3"), Ok(("SEAT".into(), 3)));
        assert!(custom("SEAT").is_err());
        assert_eq!(format_mib(65536), "64Gi");
        assert_eq!(format_cpu(8000), "8cpu");
    }
}
