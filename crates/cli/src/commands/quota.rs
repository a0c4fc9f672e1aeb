//! `gpualloc quota get|set`: a tenant's limits, approval threshold and
//! use; `set` changes only the flags given (a field mask).

use clap::{Args, Subcommand};
use gpualloc_proto::resourcepool::v1 as rp;

use crate::{connect::Session, exit::Failure, output::bar};

#[derive(Debug, Subcommand)]
pub enum Quota {
    /// Limits, use and the approval threshold.
    #[command(after_help = "Example: gpualloc quota get")]
    Get {
        /// A tenant (administrators); the token's tenant otherwise.
        #[arg(long, default_value = "")]
        tenant: String,
    },
    /// Change limits or the approval threshold (admin). Only what is given changes.
    #[command(
        after_help = "Examples:\n  gpualloc --context local-admin quota set --tenant demo --gpus 12\n  \
                            gpualloc --context local-admin quota set --tenant demo --approval-gpus 4"
    )]
    Set(Set),
}

#[derive(Debug, Args)]
pub struct Set {
    #[command(flatten)]
    pub amounts: super::Amounts,
    #[arg(long)]
    pub tenant: String,
    /// GPUs (any model).
    #[arg(long)]
    pub gpus: Option<i32>,
    /// Requests of more GPUs than this wait for an administrator.
    #[arg(long)]
    pub approval_gpus: Option<i32>,
}

pub async fn run(session: &Session, cmd: Quota) -> Result<(), Failure> {
    let mut client = session.pools.clone();
    let p = &session.print;
    let q = match cmd {
        Quota::Get { tenant } => client
            .get_tenant_quota(rp::GetTenantQuotaRequest { tenant })
            .await?
            .into_inner(),
        Quota::Set(s) => {
            // A tenant without a quota gets one made of what is given; an
            // existing one changes only that (read once, for both).
            let existing = match client
                .get_tenant_quota(rp::GetTenantQuotaRequest {
                    tenant: s.tenant.clone(),
                })
                .await
            {
                Ok(q) => Some(q.into_inner()),
                Err(e) if e.code() == tonic::Code::NotFound => None,
                Err(e) => return Err(e.into()),
            };
            let mut paths = Vec::new();
            let mut limits = rp::Resources::default();
            if let Some(n) = s.gpus {
                limits.gpus = n;
                paths.push("limits.gpus".to_owned());
            }
            if let Some(n) = s.amounts.cpu {
                limits.cpu_millis = n;
                paths.push("limits.cpu_millis".to_owned());
            }
            if let Some(n) = s.amounts.memory {
                limits.memory_mib = n;
                paths.push("limits.memory_mib".to_owned());
            }
            if let Some(n) = s.amounts.storage {
                limits.storage_gib = n;
                paths.push("limits.storage_gib".to_owned());
            }
            if !s.amounts.custom.is_empty() {
                // A mask names the map whole: merge into what is set.
                limits.custom = existing
                    .as_ref()
                    .and_then(|q| q.limits.as_ref())
                    .map(|l| l.custom.clone())
                    .unwrap_or_default();
                for (c, n) in &s.amounts.custom {
                    limits.custom.insert(c.clone(), *n);
                }
                paths.push("limits.custom".to_owned());
            }
            let mut approval = rp::Resources::default();
            if let Some(n) = s.approval_gpus {
                approval.gpus = n;
                paths.push("approval_above.gpus".to_owned());
            }
            if paths.is_empty() {
                return Err(Failure::usage(
                    "nothing to set: give --gpus, --cpu, --memory, --storage, --custom or --approval-gpus",
                ));
            }
            client
                .set_tenant_quota(rp::SetTenantQuotaRequest {
                    tenant: s.tenant,
                    limits: Some(limits),
                    approval_above: Some(approval),
                    max_hold: None,
                    update_mask: existing
                        .is_some()
                        .then_some(prost_types::FieldMask { paths }),
                })
                .await?
                .into_inner()
        }
    };
    if p.raw() {
        return p.message(&q);
    }
    let limits = q.limits.clone().unwrap_or_default();
    let usage = q.usage.clone().unwrap_or_default();
    let held = q.held.clone().unwrap_or_default();
    let approval = q.approval_above.clone().unwrap_or_default();
    let mut rows = Vec::new();
    let mut row = |class: &str, limit: i64, used: i64, held: i64, approval: i64| {
        if limit == 0 && used == 0 && held == 0 {
            return;
        }
        rows.push(vec![
            class.to_owned(),
            limit.to_string(),
            used.to_string(),
            held.to_string(),
            if approval > 0 {
                format!("> {approval}")
            } else {
                "-".into()
            },
            bar(used, limit, 10),
        ]);
    };
    row(
        "gpus",
        i64::from(limits.gpus),
        i64::from(usage.gpus),
        i64::from(held.gpus),
        i64::from(approval.gpus),
    );
    row(
        "cpu (cores)",
        limits.cpu_millis / 1000,
        usage.cpu_millis / 1000,
        held.cpu_millis / 1000,
        approval.cpu_millis / 1000,
    );
    row(
        "memory (Gi)",
        limits.memory_mib / 1024,
        usage.memory_mib / 1024,
        held.memory_mib / 1024,
        approval.memory_mib / 1024,
    );
    row(
        "storage (Gi)",
        limits.storage_gib,
        usage.storage_gib,
        held.storage_gib,
        approval.storage_gib,
    );
    let mut custom: Vec<_> = limits.custom.iter().collect();
    custom.sort();
    for (c, n) in custom {
        row(
            c,
            *n,
            usage.custom.get(c).copied().unwrap_or(0),
            held.custom.get(c).copied().unwrap_or(0),
            approval.custom.get(c).copied().unwrap_or(0),
        );
    }
    crate::output::out(&format!("tenant {}\n", q.tenant));
    p.table(
        &["CLASS", "LIMIT", "IN USE", "HELD", "APPROVAL", "USE"],
        &rows,
    );
    Ok(())
}
