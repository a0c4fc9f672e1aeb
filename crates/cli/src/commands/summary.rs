//! `gpualloc summary`: a tenant's allocations per state and its quota
//! use as bars.

use clap::Args;
use gpualloc_proto::viewer::v1 as vpb;

use crate::{
    connect::Session,
    exit::Failure,
    output::{self, bar},
};

#[derive(Debug, Args)]
#[command(after_help = "Example: gpualloc summary")]
pub struct Summary {
    /// A tenant (administrators); the token's tenant otherwise.
    #[arg(long, default_value = "")]
    pub tenant: String,
}

pub async fn run(session: &Session, s: Summary) -> Result<(), Failure> {
    let p = &session.print;
    let r = session
        .viewer
        .clone()
        .get_tenant_summary(vpb::GetTenantSummaryRequest { tenant: s.tenant })
        .await?
        .into_inner();
    if p.raw() {
        return p.message(&r);
    }
    output::out(&format!("tenant {}\n\n", r.tenant));
    let counts: Vec<Vec<String>> = r
        .counts
        .iter()
        .map(|c| vec![p.state(c.state), c.count.to_string()])
        .collect();
    p.table(&["STATE", "COUNT"], &counts);
    let used = r.in_use.clone().unwrap_or_default();
    let quota = r.quota.clone().unwrap_or_default();
    let mut rows = Vec::new();
    let mut row = |class: &str, u: i64, q: i64| {
        if q > 0 || u > 0 {
            rows.push(vec![class.to_owned(), format!("{u} / {q}"), bar(u, q, 20)]);
        }
    };
    row("gpus", i64::from(used.gpus), i64::from(quota.gpus));
    row(
        "cpu (cores)",
        used.cpu_millis / 1000,
        quota.cpu_millis / 1000,
    );
    row(
        "memory (Gi)",
        used.memory_mib / 1024,
        quota.memory_mib / 1024,
    );
    row("storage (Gi)", used.storage_gib, quota.storage_gib);
    let mut custom: Vec<_> = quota.custom.iter().collect();
    custom.sort();
    for (c, q) in custom {
        row(c, used.custom.get(c).copied().unwrap_or(0), *q);
    }
    output::out("\n");
    p.table(&["QUOTA", "IN USE", ""], &rows);
    Ok(())
}
