//! Usage reports people can bill from, from the history of state changes:
//! an allocation is billed for the time it spent `ALLOCATED` (from the
//! change into that state to the next change, or now), clipped to a UTC
//! month or any range, with the resources it was granted (the GPU model
//! the pool chose included). Amounts are rounded per line ([`ROUNDING`])
//! and totals are sums of rounded lines, so that a bill adds up; every
//! tenant's report can be combined into one with grand totals, and
//! rendered as CSV for spreadsheets.

use std::{collections::BTreeMap, path::Path};

use gpualloc_domain::{Resources, State};
use gpualloc_proto::{events::v1 as ev, viewer::v1 as pb};
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
        card.check()
            .map_err(|e| anyhow::anyhow!("the rate card {} {e}", path.display()))?;
        Ok(card)
    }

    /// A rate card sent with a request; `Err` says what is wrong with it.
    pub fn from_request(card: pb::RateCard) -> Result<RateCard, String> {
        if card.currency.trim().is_empty() || card.currency.len() > 16 {
            return Err("needs a currency of at most 16 characters".into());
        }
        if card.gpu_hour.len() + card.custom_unit_hour.len() > 256 {
            return Err("has more than 256 prices".into());
        }
        let card = RateCard {
            currency: card.currency,
            gpu_hour: card.gpu_hour.into_iter().collect(),
            cpu_core_hour: card.cpu_core_hour,
            memory_gib_hour: card.memory_gib_hour,
            storage_gib_hour: card.storage_gib_hour,
            custom_unit_hour: card.custom_unit_hour.into_iter().collect(),
        };
        card.check()?;
        Ok(card)
    }

    fn check(&self) -> Result<(), String> {
        let card = self;
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
                return Err("has a negative or invalid price".into());
            }
        }
        Ok(())
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

/// How a report rounds, as the report states it.
pub const ROUNDING: &str = "hours to 0.001 and costs to 0.01, half away from zero, per line; totals are sums of the rounded lines";

fn round_to(x: f64, places: i32) -> f64 {
    let f = 10f64.powi(places);
    // `+ 0.0` turns -0.0 (an empty sum) into 0.
    (x * f).round() / f + 0.0
}

/// Builds the report of `tenant` for `[from, to)` from its history rows
/// (ordered by allocation, then version), counting open intervals up to
/// `now`. `month` names the range when it is one.
pub fn report(
    tenant: &str,
    month: &str,
    (from, to): (i64, i64),
    rows: &[HistoryRow],
    now: i64,
    rates: Option<&RateCard>,
) -> Result<pb::UsageReport, Error> {
    // Per allocation: the line, and the first and last moment counted.
    let mut lines: BTreeMap<String, (pb::UsageLine, i64, i64)> = BTreeMap::new();
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
        let a = ev::AllocationSnapshot::decode(row.snapshot.as_slice()).map_err(|e| {
            Error::BadEvent(format!("stored snapshot of {}: {e}", row.allocation_id))
        })?;
        let r = Resources::try_from(a.resources.clone().unwrap_or_default())
            .map_err(|e| Error::BadEvent(format!("stored resources: {e}")))?;
        let (line, first, last) = lines.entry(row.allocation_id.clone()).or_insert_with(|| {
            (
                pb::UsageLine {
                    allocation_id: row.allocation_id.clone(),
                    pool: a.pool.clone(),
                    gpu_model: r.gpu_model().map(|m| m.to_string()).unwrap_or_default(),
                    labels: a.labels.clone(),
                    display_name: a.display_name.clone(),
                    tenant: tenant.to_owned(),
                    ..Default::default()
                },
                start,
                end,
            )
        });
        *first = (*first).min(start);
        *last = (*last).max(end);
        line.hours += hours;
        line.gpu_hours += r.gpus() as f64 * hours;
        line.cpu_core_hours += r.cpu_millis() as f64 / 1000.0 * hours;
        line.memory_gib_hours += r.memory_mib() as f64 / 1024.0 * hours;
        line.storage_gib_hours += r.storage_gib() as f64 * hours;
        for (c, v) in r.custom() {
            *line.custom_unit_hours.entry(c.to_string()).or_default() += *v as f64 * hours;
        }
    }
    let mut out = pb::UsageReport {
        tenant: tenant.to_owned(),
        month: month.to_owned(),
        currency: rates.map(|r| r.currency.clone()).unwrap_or_default(),
        start_time: Some(gpualloc_domain::time::to_timestamp(from)),
        end_time: Some(gpualloc_domain::time::to_timestamp(to)),
        rounding: ROUNDING.to_owned(),
        ..Default::default()
    };
    for (mut line, first, last) in lines.into_values() {
        line.start_time = Some(gpualloc_domain::time::to_timestamp(first));
        line.end_time = Some(gpualloc_domain::time::to_timestamp(last));
        line.hours = round_to(line.hours, 3);
        line.gpu_hours = round_to(line.gpu_hours, 3);
        line.cpu_core_hours = round_to(line.cpu_core_hours, 3);
        line.memory_gib_hours = round_to(line.memory_gib_hours, 3);
        line.storage_gib_hours = round_to(line.storage_gib_hours, 3);
        for h in line.custom_unit_hours.values_mut() {
            *h = round_to(*h, 3);
        }
        // Priced on the rounded quantities: what the bill shows.
        if let Some(r) = rates {
            line.cost = round_to(r.cost(&line), 2);
        }
        out.lines.push(line);
    }
    add_up(&mut out);
    Ok(out)
}

/// Sets a report's totals to the sums of its lines (rounded again only to
/// drop floating-point noise).
fn add_up(out: &mut pb::UsageReport) {
    let mut gpu: BTreeMap<String, f64> = BTreeMap::new();
    let (mut cpu, mut mem, mut storage, mut cost) = (0.0, 0.0, 0.0, 0.0);
    let mut custom: BTreeMap<String, f64> = BTreeMap::new();
    for line in &out.lines {
        if line.gpu_hours > 0.0 {
            *gpu.entry(line.gpu_model.clone()).or_default() += line.gpu_hours;
        }
        cpu += line.cpu_core_hours;
        mem += line.memory_gib_hours;
        storage += line.storage_gib_hours;
        cost += line.cost;
        for (c, h) in &line.custom_unit_hours {
            *custom.entry(c.clone()).or_default() += h;
        }
    }
    out.gpu_hours = gpu
        .into_iter()
        .map(|(gpu_model, hours)| pb::GpuHours {
            gpu_model,
            hours: round_to(hours, 3),
        })
        .collect();
    out.cpu_core_hours = round_to(cpu, 3);
    out.memory_gib_hours = round_to(mem, 3);
    out.storage_gib_hours = round_to(storage, 3);
    out.total_cost = round_to(cost, 2);
    out.custom_unit_hours = custom
        .into_iter()
        .map(|(c, h)| (c, round_to(h, 3)))
        .collect();
}

/// Every tenant's report in one: a section per tenant, and the grand
/// totals (sums of every tenant's lines) in the outer report.
pub fn combine(
    month: &str,
    (from, to): (i64, i64),
    tenants: Vec<pb::UsageReport>,
    rates: Option<&RateCard>,
) -> pb::UsageReport {
    let mut out = pb::UsageReport {
        month: month.to_owned(),
        currency: rates.map(|r| r.currency.clone()).unwrap_or_default(),
        start_time: Some(gpualloc_domain::time::to_timestamp(from)),
        end_time: Some(gpualloc_domain::time::to_timestamp(to)),
        rounding: ROUNDING.to_owned(),
        lines: tenants.iter().flat_map(|t| t.lines.clone()).collect(),
        ..Default::default()
    };
    add_up(&mut out);
    // The sections carry the lines; the grand total need not repeat them.
    out.lines.clear();
    out.tenants = tenants;
    out
}

use gpualloc_domain::time::civil_from_days;
pub use gpualloc_domain::time::rfc3339;

/// The UTC month ("YYYY-MM") that `micros` falls in.
pub fn month_of(micros: i64) -> String {
    let (y, m, _) = civil_from_days(micros.div_euclid(86_400_000_000));
    format!("{y:04}-{m:02}")
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_owned()
    }
}

fn pairs<V: std::fmt::Display>(m: &BTreeMap<String, V>) -> String {
    m.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(";")
}

/// Hours as the CSV writes them: always three decimals (the precision
/// they are rounded to), so a column reads the same in every row.
fn h(v: f64) -> String {
    format!("{:.3}", v + 0.0)
}

/// Money: always two decimals.
fn money(v: f64) -> String {
    format!("{:.2}", v + 0.0)
}

fn hours_pairs(m: &BTreeMap<String, f64>) -> String {
    pairs(&m.iter().map(|(k, v)| (k.clone(), h(*v))).collect())
}

/// The report as CSV: a header, one row per line, and a `TOTAL` row per
/// tenant (and a grand `TOTAL` row for every tenant's report).
pub fn to_csv(report: &pb::UsageReport) -> String {
    let mut out = String::from(
        "tenant,allocation_id,display_name,pool,gpu_model,start_time,end_time,hours,gpu_hours,cpu_core_hours,memory_gib_hours,storage_gib_hours,custom_unit_hours,labels,cost,currency\n",
    );
    let sections: Vec<&pb::UsageReport> = if report.tenants.is_empty() {
        vec![report]
    } else {
        report.tenants.iter().collect()
    };
    let ts = |t: &Option<prost_types::Timestamp>| {
        t.as_ref()
            .map(|t| rfc3339(gpualloc_domain::time::from_timestamp(t)))
            .unwrap_or_default()
    };
    let total = |out: &mut String, tenant: &str, r: &pb::UsageReport| {
        let gpu: f64 = r.gpu_hours.iter().map(|g| g.hours).sum();
        let custom: BTreeMap<String, f64> = r.custom_unit_hours.clone().into_iter().collect();
        out.push_str(&format!(
            "{},TOTAL,,,,{},{},,{},{},{},{},{},,{},{}\n",
            csv_field(tenant),
            ts(&r.start_time),
            ts(&r.end_time),
            h(round_to(gpu, 3)),
            h(r.cpu_core_hours),
            h(r.memory_gib_hours),
            h(r.storage_gib_hours),
            csv_field(&hours_pairs(&custom)),
            money(r.total_cost),
            csv_field(&r.currency),
        ));
    };
    for section in &sections {
        for l in &section.lines {
            let custom: BTreeMap<String, f64> = l.custom_unit_hours.clone().into_iter().collect();
            let labels: BTreeMap<String, String> = l.labels.clone().into_iter().collect();
            out.push_str(&format!(
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}\n",
                csv_field(&l.tenant),
                csv_field(&l.allocation_id),
                csv_field(&l.display_name),
                csv_field(&l.pool),
                csv_field(&l.gpu_model),
                ts(&l.start_time),
                ts(&l.end_time),
                h(l.hours),
                h(l.gpu_hours),
                h(l.cpu_core_hours),
                h(l.memory_gib_hours),
                h(l.storage_gib_hours),
                csv_field(&hours_pairs(&custom)),
                csv_field(&pairs(&labels)),
                money(l.cost),
                csv_field(&section.currency),
            ));
        }
        total(&mut out, &section.tenant, section);
    }
    if !report.tenants.is_empty() {
        total(&mut out, "*", report);
    }
    out
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

    #[test]
    fn dates_round_trip() {
        let (a, _) = month_bounds("2026-11").unwrap();
        assert_eq!(rfc3339(a), "2026-11-01T00:00:00Z");
        assert_eq!(rfc3339(a + 3_723_000_000), "2026-11-01T01:02:03Z");
        assert_eq!(month_of(a), "2026-11");
        assert_eq!(month_of(a - 1), "2026-10");
        let (_, end) = month_bounds("2024-02").unwrap();
        assert_eq!(rfc3339(end - 1_000_000), "2024-02-29T23:59:59Z");
    }

    #[test]
    fn amounts_round_half_away_from_zero_and_totals_add_up() {
        assert_eq!(round_to(0.0015, 3), 0.002);
        assert_eq!(round_to(2.345_49, 2), 2.35);
        let line = |id: &str, hours: f64, cost: f64| pb::UsageLine {
            allocation_id: id.into(),
            tenant: "t".into(),
            hours,
            cpu_core_hours: hours,
            cost,
            ..Default::default()
        };
        let mut r = pb::UsageReport {
            lines: vec![
                line("a", 0.333, 0.33),
                line("b", 0.333, 0.33),
                line("c", 0.333, 0.33),
            ],
            ..Default::default()
        };
        add_up(&mut r);
        // The sum of what each line shows, not a re-rounded grand figure.
        assert_eq!(r.cpu_core_hours, 0.999);
        assert_eq!(r.total_cost, 0.99);
    }

    #[test]
    fn csv_quotes_what_needs_quoting_and_totals_each_tenant() {
        let line = pb::UsageLine {
            allocation_id: "a1".into(),
            tenant: "t".into(),
            display_name: "run, \"seven\"".into(),
            hours: 1.5,
            labels: [("team".to_owned(), "ml".to_owned())].into_iter().collect(),
            ..Default::default()
        };
        let mut t = pb::UsageReport {
            tenant: "t".into(),
            lines: vec![line],
            ..Default::default()
        };
        add_up(&mut t);
        let all = combine("2026-11", month_bounds("2026-11").unwrap(), vec![t], None);
        let csv = to_csv(&all);
        let rows: Vec<&str> = csv.lines().collect();
        assert_eq!(rows.len(), 4, "{csv}");
        assert!(rows[1].starts_with("t,a1,\"run, \"\"seven\"\"\","), "{csv}");
        assert!(rows[1].contains("team=ml"), "{csv}");
        assert!(rows[2].starts_with("t,TOTAL,"), "{csv}");
        assert!(
            rows[3].starts_with("*,TOTAL,,,,2026-11-01T00:00:00Z,2026-12-01T00:00:00Z,"),
            "{csv}"
        );
        assert!(!csv.contains(",-0"), "{csv}");
        assert!(rows[1].contains(",1.500,0.000,"), "fixed decimals: {csv}");
        assert!(rows[1].ends_with(",0.00,"), "cost in cents: {csv}");
    }
}
