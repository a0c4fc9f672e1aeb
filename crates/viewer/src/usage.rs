//! Monthly usage reports, from the history of state changes: an allocation
//! is billed for the time it spent `ALLOCATED` (from the change into that
//! state to the next change, or now), clipped to the month in UTC, with the
//! resources it was granted (the GPU model the pool chose included).

use std::{collections::BTreeMap, path::Path};

use gpualloc_domain::{Resources, State};
use gpualloc_proto::{allocation::v1 as apb, viewer::v1 as pb};
use prost::Message;
use serde::Deserialize;

use crate::{Error, store::HistoryRow};

const MICROS_PER_HOUR: f64 = 3_600_000_000.0;

/// Prices per unit-hour, loaded from the JSON file named by
/// `GPUALLOC_RATE_CARD`, e.g.
/// `{"currency": "EUR", "gpu_hour": {"A100": 2.5, "*": 1.0},
///   "cpu_core_hour": 0.04, "memory_gib_hour": 0.005,
///   "storage_gib_hour": 0.0001, "custom_unit_hour": {"SEAT": 0.5}}`.
/// `"*"` prices GPU models that are not listed.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateCard {
    pub currency: String,
    #[serde(default)]
    pub gpu_hour: BTreeMap<String, f64>,
    #[serde(default)]
    pub cpu_core_hour: f64,
    #[serde(default)]
    pub memory_gib_hour: f64,
    #[serde(default)]
    pub storage_gib_hour: f64,
    #[serde(default)]
    pub custom_unit_hour: BTreeMap<String, f64>,
}

impl RateCard {
    pub fn load(path: &Path) -> anyhow::Result<RateCard> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("reading the rate card {}: {e}", path.display()))?;
        let card: RateCard = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("the rate card {} is not valid: {e}", path.display()))?;
        let prices = card
            .gpu_hour
            .values()
            .chain(card.custom_unit_hour.values())
            .chain([
                &card.cpu_core_hour,
                &card.memory_gib_hour,
                &card.storage_gib_hour,
            ]);
        for p in prices {
            if !p.is_finite() || *p < 0.0 {
                anyhow::bail!(
                    "the rate card {} has a negative or invalid price",
                    path.display()
                );
            }
        }
        Ok(card)
    }

    fn cost(&self, line: &pb::UsageLine) -> f64 {
        let gpu_rate = self
            .gpu_hour
            .get(&line.gpu_model)
            .or_else(|| self.gpu_hour.get("*"))
            .copied()
            .unwrap_or(0.0);
        let custom: f64 = line
            .custom_unit_hours
            .iter()
            .map(|(c, h)| h * self.custom_unit_hour.get(c).copied().unwrap_or(0.0))
            .sum();
        line.gpu_hours * gpu_rate
            + line.cpu_core_hours * self.cpu_core_hour
            + line.memory_gib_hours * self.memory_gib_hour
            + line.storage_gib_hours * self.storage_gib_hour
            + custom
    }
}

/// Days since 1970-01-01 of a civil date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// `[start, end)` of a "YYYY-MM" month in UTC, in microseconds.
pub fn month_bounds(month: &str) -> Result<(i64, i64), String> {
    let bad = || format!("{month:?} is not a month like 2026-11");
    let (y, m) = month.split_once('-').ok_or_else(bad)?;
    if y.len() != 4 || m.len() != 2 {
        return Err(bad());
    }
    let y: i64 = y.parse().map_err(|_| bad())?;
    let m: i64 = m.parse().map_err(|_| bad())?;
    if !(1970..=9999).contains(&y) || !(1..=12).contains(&m) {
        return Err(bad());
    }
    let (ny, nm) = if m == 12 { (y + 1, 1) } else { (y, m + 1) };
    let day = 86_400_000_000i64;
    Ok((
        days_from_civil(y, m, 1) * day,
        days_from_civil(ny, nm, 1) * day,
    ))
}

/// Builds the report of `tenant` for `[from, to)` from its history rows
/// (ordered by allocation, then version), counting open intervals up to
/// `now`.
pub fn report(
    tenant: &str,
    month: &str,
    (from, to): (i64, i64),
    rows: &[HistoryRow],
    now: i64,
    rates: Option<&RateCard>,
) -> Result<pb::UsageReport, Error> {
    let mut lines: BTreeMap<String, pb::UsageLine> = BTreeMap::new();
    for (i, row) in rows.iter().enumerate() {
        if row.state != State::Allocated.as_str() {
            continue;
        }
        let next = rows
            .get(i + 1)
            .filter(|n| n.allocation_id == row.allocation_id)
            .map(|n| n.change_time)
            .unwrap_or(now);
        let start = row.change_time.max(from);
        let end = next.min(to).min(now);
        if end <= start {
            continue;
        }
        let hours = (end - start) as f64 / MICROS_PER_HOUR;
        let a = apb::Allocation::decode(row.snapshot.as_slice()).map_err(|e| {
            Error::BadEvent(format!("stored snapshot of {}: {e}", row.allocation_id))
        })?;
        let r = Resources::try_from(a.resources.clone().unwrap_or_default())
            .map_err(|e| Error::BadEvent(format!("stored resources: {e}")))?;
        let line = lines
            .entry(row.allocation_id.clone())
            .or_insert_with(|| pb::UsageLine {
                allocation_id: row.allocation_id.clone(),
                pool: a.pool.clone(),
                gpu_model: r
                    .gpu_model
                    .as_ref()
                    .map(|m| m.to_string())
                    .unwrap_or_default(),
                ..Default::default()
            });
        line.hours += hours;
        line.gpu_hours += r.gpus as f64 * hours;
        line.cpu_core_hours += r.cpu_millis as f64 / 1000.0 * hours;
        line.memory_gib_hours += r.memory_mib as f64 / 1024.0 * hours;
        line.storage_gib_hours += r.storage_gib as f64 * hours;
        for (c, v) in &r.custom {
            *line.custom_unit_hours.entry(c.to_string()).or_default() += *v as f64 * hours;
        }
    }
    let mut out = pb::UsageReport {
        tenant: tenant.to_owned(),
        month: month.to_owned(),
        currency: rates.map(|r| r.currency.clone()).unwrap_or_default(),
        ..Default::default()
    };
    let mut gpu: BTreeMap<String, f64> = BTreeMap::new();
    for mut line in lines.into_values() {
        if line.gpu_hours > 0.0 {
            *gpu.entry(line.gpu_model.clone()).or_default() += line.gpu_hours;
        }
        out.cpu_core_hours += line.cpu_core_hours;
        out.memory_gib_hours += line.memory_gib_hours;
        out.storage_gib_hours += line.storage_gib_hours;
        for (c, h) in &line.custom_unit_hours {
            *out.custom_unit_hours.entry(c.clone()).or_default() += h;
        }
        if let Some(r) = rates {
            line.cost = r.cost(&line);
            out.total_cost += line.cost;
        }
        out.lines.push(line);
    }
    out.gpu_hours = gpu
        .into_iter()
        .map(|(gpu_model, hours)| pb::GpuHours { gpu_model, hours })
        .collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_have_their_calendar_length() {
        let day = 86_400_000_000i64;
        let (a, b) = month_bounds("2026-11").unwrap();
        assert_eq!((b - a) / day, 30);
        let (a, b) = month_bounds("2024-02").unwrap();
        assert_eq!((b - a) / day, 29);
        let (_, dec_end) = month_bounds("2026-12").unwrap();
        let (jan_start, _) = month_bounds("2027-01").unwrap();
        assert_eq!(dec_end, jan_start);
        // 2026-11-01T00:00:00Z
        assert_eq!(month_bounds("2026-11").unwrap().0, 1_793_491_200_000_000);
        for bad in ["2026-13", "2026-1", "26-11", "2026/11", "", "abcd-ef"] {
            assert!(month_bounds(bad).is_err(), "{bad}");
        }
    }
}
