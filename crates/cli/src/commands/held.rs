//! `gpualloc held`: the hold queue in admission order, with positions,
//! priority, age and the estimated start (like `squeue --state=PD`).

use clap::Args;
use gpualloc_proto::resourcepool::v1 as rp;

use crate::{
    connect::Session,
    exit::Failure,
    output::{self, now_secs, relative, short_id},
};

/// `gpualloc held [--model M] [--pool P] [--tenant T]`
#[derive(Debug, Args)]
#[command(after_help = "Examples:\n  gpualloc held\n  gpualloc held --model A100")]
pub struct Held {
    /// Only requests for this GPU model.
    #[arg(long, default_value = "")]
    pub model: String,
    /// Only this pool's queue.
    #[arg(long, default_value = "")]
    pub pool: String,
    /// A tenant (administrators see every tenant without it).
    #[arg(long, default_value = "")]
    pub tenant: String,
}

pub async fn run(session: &Session, h: Held) -> Result<(), Failure> {
    let p = &session.print;
    let mut r = session
        .pools
        .clone()
        .list_held(rp::ListHeldRequest {
            pool_id: h.pool,
            tenant: h.tenant,
        })
        .await?
        .into_inner();
    if !h.model.is_empty() {
        r.held.retain(|x| {
            x.resources
                .as_ref()
                .is_some_and(|res| res.gpu_model.eq_ignore_ascii_case(&h.model))
        });
    }
    if p.raw() {
        return p.message(&r);
    }
    let now = now_secs();
    let rows: Vec<Vec<String>> = r
        .held
        .iter()
        .map(|x| {
            vec![
                x.position.to_string(),
                if p.wide() {
                    x.allocation_id.clone()
                } else {
                    short_id(&x.allocation_id)
                },
                x.tenant.clone(),
                x.priority.to_string(),
                output::resources(x.resources.as_ref()),
                relative(x.request_time.as_ref(), now).replace(" ago", ""),
                x.estimated_start_time
                    .as_ref()
                    .map(|t| relative(Some(t), now))
                    .unwrap_or_else(|| "unknown".into()),
            ]
        })
        .collect();
    p.table(
        &[
            "POS",
            "ID",
            "TENANT",
            "PRIORITY",
            "RESOURCES",
            "WAITING",
            "EST. START",
        ],
        &rows,
    );
    Ok(())
}
