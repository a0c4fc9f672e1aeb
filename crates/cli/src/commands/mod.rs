//! One module per command group; what they share: the resource amount
//! flags, and finding an allocation by a short id.

pub mod alloc;
pub mod config_cmd;
pub mod held;
pub mod pools;
pub mod quota;
pub mod summary;
pub mod usage;
pub mod watch;

use clap::Args;
use gpualloc_proto::viewer::v1 as vpb;

use crate::{
    connect::Session,
    exit::{Failure, codes},
    input,
    output::short_id,
};

/// The amounts every resource-taking command accepts, typed as people
/// write them (create, pools put, quota set).
#[derive(Debug, Args)]
pub struct Amounts {
    /// CPU: cores (8, 0.5) or millicores (500m).
    #[arg(long, value_parser = input::cpu)]
    pub cpu: Option<i64>,
    /// Memory: 512Mi, 64Gi, 1Ti.
    #[arg(long, value_parser = input::memory_mib)]
    pub memory: Option<i64>,
    /// Storage: 500Gi, 2Ti.
    #[arg(long, value_parser = input::storage_gib)]
    pub storage: Option<i64>,
    /// A custom class: CLASS=COUNT (repeatable), e.g. SEAT=3.
    #[arg(long = "custom", value_parser = input::custom)]
    pub custom: Vec<(String, i64)>,
}

/// The full id of the allocation `input` names: a full id, an unambiguous
/// prefix, or the `01a22a40…0f05` form tables show (searched among the
/// tenant's allocations that the viewer knows).
pub async fn resolve_id(session: &Session, input: &str, tenant: &str) -> Result<String, Failure> {
    let input = input.trim();
    if input.len() == 36 && input.bytes().filter(|b| *b == b'-').count() == 4 {
        return Ok(input.to_owned());
    }
    let (head, tail) = match input.split_once('…').or_else(|| input.split_once("...")) {
        Some((h, t)) => (h, t),
        None => (input, ""),
    };
    if head.is_empty() {
        return Err(Failure::usage("an allocation id (or its first characters)"));
    }
    let mut viewer = session.viewer.clone();
    let mut matches = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = viewer
            .list_allocation_views(vpb::ListAllocationViewsRequest {
                tenant: tenant.to_owned(),
                page_size: 500,
                page_token: page_token.clone(),
                ..Default::default()
            })
            .await?
            .into_inner();
        for v in page.allocations {
            if let Some(a) = v.allocation
                && a.allocation_id.starts_with(head)
                && a.allocation_id.ends_with(tail)
            {
                matches.push(a.allocation_id);
            }
        }
        if page.next_page_token.is_empty() {
            break;
        }
        page_token = page.next_page_token;
    }
    match matches.len() {
        1 => Ok(matches.remove(0)),
        0 => Err(Failure {
            code: codes::NOT_FOUND,
            message: format!("no allocation matches {input:?}"),
            details: Vec::new(),
        }),
        n => Err(Failure {
            code: codes::USAGE,
            message: format!("{input:?} is ambiguous: {n} allocations match; give more characters"),
            details: matches.iter().take(10).map(|m| short_id(m)).collect(),
        }),
    }
}
