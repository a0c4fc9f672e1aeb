//! `gpualloc usage`: per-allocation lines and totals for a month or any
//! range (like `sacct`); `-o csv` for spreadsheets.

use clap::Args;
use gpualloc_proto::viewer::v1 as vpb;

use crate::{
    connect::Session,
    exit::Failure,
    output::{self, Format, short_id},
};

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  gpualloc usage\n  gpualloc usage --month 2026-11 -o csv > november.csv\n  \
                        gpualloc usage --from 2026-11-01 --to 2026-11-15\n  \
                        gpualloc --context local-admin usage --all-tenants"
)]
pub struct Usage {
    /// A UTC month, YYYY-MM (the current one by default).
    #[arg(long, conflicts_with_all = ["from", "to"])]
    pub month: Option<String>,
    /// Start of a range: YYYY-MM-DD or an RFC 3339 time (UTC).
    #[arg(long, requires = "to")]
    pub from: Option<String>,
    /// End of a range (exclusive).
    #[arg(long, requires = "from")]
    pub to: Option<String>,
    /// A tenant (administrators); the token's tenant otherwise.
    #[arg(long, default_value = "")]
    pub tenant: String,
    /// Every tenant, a section each, with grand totals (administrators).
    #[arg(long, conflicts_with = "tenant")]
    pub all_tenants: bool,
    /// Price with this rate card (the JSON of the viewer's, see
    /// docs/operations.md) instead of the viewer's own: what would it cost.
    #[arg(long)]
    pub rate_card: Option<std::path::PathBuf>,
}

/// The rate card file, as the API takes it.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CardFile {
    currency: String,
    #[serde(default)]
    gpu_hour: std::collections::BTreeMap<String, f64>,
    #[serde(default)]
    cpu_core_hour: f64,
    #[serde(default)]
    memory_gib_hour: f64,
    #[serde(default)]
    storage_gib_hour: f64,
    #[serde(default)]
    custom_unit_hour: std::collections::BTreeMap<String, f64>,
}

fn rate_card(path: &std::path::Path) -> Result<vpb::RateCard, Failure> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Failure::usage(format!("rate card {}: {e}", path.display())))?;
    let c: CardFile = serde_json::from_str(&text)
        .map_err(|e| Failure::usage(format!("rate card {}: {e}", path.display())))?;
    Ok(vpb::RateCard {
        currency: c.currency,
        gpu_hour: c.gpu_hour,
        cpu_core_hour: c.cpu_core_hour,
        memory_gib_hour: c.memory_gib_hour,
        storage_gib_hour: c.storage_gib_hour,
        custom_unit_hour: c.custom_unit_hour,
    })
}

/// `2026-11-01` or `2026-11-01T10:00:00Z` as a timestamp.
fn timestamp(s: &str) -> Result<prost_types::Timestamp, Failure> {
    let full = if s.len() == 10 {
        format!("{s}T00:00:00Z")
    } else {
        s.to_owned()
    };
    full.parse::<prost_types::Timestamp>()
        .map_err(|_| Failure::usage(format!("{s:?}: YYYY-MM-DD or an RFC 3339 time")))
}

pub async fn run(session: &Session, u: Usage) -> Result<(), Failure> {
    let p = &session.print;
    let csv = p.format == Format::Csv;
    let report = session
        .viewer
        .clone()
        .get_usage_report(vpb::GetUsageReportRequest {
            tenant: if u.all_tenants {
                String::new()
            } else {
                u.tenant
            },
            month: u.month.unwrap_or_default(),
            start_time: u.from.as_deref().map(timestamp).transpose()?,
            end_time: u.to.as_deref().map(timestamp).transpose()?,
            format: if csv {
                vpb::ReportFormat::Csv as i32
            } else {
                vpb::ReportFormat::Unspecified as i32
            },
            rate_card: u.rate_card.as_deref().map(rate_card).transpose()?,
        })
        .await?
        .into_inner();
    if csv {
        output::out(&report.csv);
        return Ok(());
    }
    if p.raw() {
        return p.message(&report);
    }
    let sections: Vec<&vpb::UsageReport> = if report.tenants.is_empty() {
        vec![&report]
    } else {
        report.tenants.iter().collect()
    };
    let priced = !report.currency.is_empty();
    let mut rows = Vec::new();
    for s in &sections {
        for l in &s.lines {
            let mut row = vec![
                l.tenant.clone(),
                if p.wide() {
                    l.allocation_id.clone()
                } else {
                    short_id(&l.allocation_id)
                },
                if l.display_name.is_empty() {
                    "-".into()
                } else {
                    l.display_name.clone()
                },
                l.pool.clone(),
                format!("{:.3}", l.hours),
                format!("{:.3}", l.gpu_hours),
                format!("{:.3}", l.cpu_core_hours),
                format!("{:.3}", l.memory_gib_hours),
                format!("{:.3}", l.storage_gib_hours),
            ];
            if priced {
                row.push(format!("{:.2}", l.cost));
            }
            rows.push(row);
        }
        let gpu: f64 = s.gpu_hours.iter().map(|g| g.hours).sum();
        let mut total = vec![
            s.tenant.clone(),
            "TOTAL".into(),
            String::new(),
            String::new(),
            String::new(),
            format!("{:.3}", gpu + 0.0),
            format!("{:.3}", s.cpu_core_hours),
            format!("{:.3}", s.memory_gib_hours),
            format!("{:.3}", s.storage_gib_hours),
        ];
        if priced {
            total.push(format!("{:.2}", s.total_cost));
        }
        rows.push(total);
    }
    let mut columns = vec![
        "TENANT",
        "ID",
        "NAME",
        "POOL",
        "HOURS",
        "GPU-H",
        "CPU-H",
        "MEM-GIB-H",
        "DISK-GIB-H",
    ];
    let cost = format!("COST ({})", report.currency);
    if priced {
        columns.push(&cost);
    }
    let range = match (&report.start_time, &report.end_time) {
        (Some(a), Some(b)) => format!("{a} to {b}"),
        _ => report.month.clone(),
    };
    output::out(&format!("usage {range}\n"));
    p.table(&columns, &rows);
    if sections.len() > 1 && priced {
        output::out(&format!(
            "all tenants: {:.2} {}\n",
            report.total_cost, report.currency
        ));
    }
    Ok(())
}
