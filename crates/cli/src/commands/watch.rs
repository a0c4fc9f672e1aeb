//! `gpualloc watch`: the viewer's stream of changes. On a terminal a live
//! table is redrawn in place; otherwise one line per change, so it pipes
//! into `grep` and log files. When the stream breaks (a viewer replica
//! stopping), it reconnects with the last version it saw of each
//! allocation, so nothing is missed or shown twice.

use std::{collections::BTreeMap, time::Duration};

use clap::Args;
use gpualloc_domain::Backoff;
use gpualloc_proto::viewer::v1 as vpb;
use tokio_stream::StreamExt;

use crate::{
    connect::Session,
    exit::Failure,
    output::{self, now_secs, relative, short_id, state_name},
};

#[derive(Debug, Args)]
#[command(
    after_help = "Examples:\n  gpualloc watch\n  gpualloc watch 01a22a40…0f05\n  gpualloc watch -o json | jq ."
)]
pub struct Watch {
    /// Follow one allocation.
    pub id: Option<String>,
    /// A tenant (administrators).
    #[arg(long, default_value = "")]
    pub tenant: String,
}

pub async fn run(session: &Session, w: Watch) -> Result<(), Failure> {
    let p = &session.print;
    let allocation_id = match &w.id {
        Some(id) => crate::commands::resolve_id(session, id, &w.tenant).await?,
        None => String::new(),
    };
    let request = |resume: &BTreeMap<String, i64>| vpb::WatchAllocationsRequest {
        tenant: w.tenant.clone(),
        allocation_id: allocation_id.clone(),
        resume_versions: resume.clone().into_iter().collect(),
    };
    // The last version received of each allocation: the resume point when
    // the stream breaks (a viewer replica stopping, a network blip).
    let mut resume: BTreeMap<String, i64> = BTreeMap::new();
    let mut stream = session
        .viewer
        .clone()
        .watch_allocations(request(&resume))
        .await?
        .into_inner();
    let mut retry = 0u32;
    let live = p.tty && !p.raw();
    let mut views: BTreeMap<String, vpb::AllocationView> = BTreeMap::new();
    let mut drawn_lines = 0usize;
    let mut snapshot_done = false;
    if live {
        output::out("\x1b[?25l");
    }
    let outcome = loop {
        let next = tokio::select! {
            _ = tokio::signal::ctrl_c() => break Ok(()),
            next = stream.next() => next,
        };
        let event = match next {
            // Ended, a replica going away, a reset connection, a watcher
            // that fell behind: reconnect from where it stood, so nothing
            // is missed and nothing repeated. A refusal of the request
            // itself is final.
            None => None,
            Some(Err(status)) if resumable(status.code()) => None,
            Some(Err(status)) => break Err(status.into()),
            Some(Ok(e)) => Some(e),
        };
        let Some(event) = event else {
            if !reconnect(session, &mut stream, request(&resume), &mut retry).await {
                break Ok(());
            }
            continue;
        };
        retry = 0;
        if let Some(a) = event.view.as_ref().and_then(|v| v.allocation.as_ref()) {
            let v = resume.entry(a.allocation_id.clone()).or_default();
            *v = (*v).max(a.version);
        }
        if p.raw() {
            p.message(&event)?;
            continue;
        }
        let kind =
            vpb::WatchEventType::try_from(event.r#type).unwrap_or(vpb::WatchEventType::Unspecified);
        if kind == vpb::WatchEventType::SnapshotEnd {
            snapshot_done = true;
        }
        let Some(view) = event.view else {
            if live && snapshot_done {
                drawn_lines = redraw(session, &views, drawn_lines);
            }
            continue;
        };
        let Some(a) = view.allocation.clone() else {
            continue;
        };
        if live {
            views.insert(a.allocation_id.clone(), view);
            if snapshot_done {
                drawn_lines = redraw(session, &views, drawn_lines);
            }
        } else if kind == vpb::WatchEventType::Change || kind == vpb::WatchEventType::Snapshot {
            output::out(&format!(
                "{} {} v{} {} {}\n",
                short_id(&a.allocation_id),
                state_name(a.state),
                a.version,
                if a.pool.is_empty() { "-" } else { &a.pool },
                a.reason
            ));
        }
    };
    if live {
        output::out("\x1b[?25h");
    }
    outcome
}

/// Opens the stream again with the resume point, waiting longer after
/// each failure (up to 5 s); says so on stderr.
fn resumable(code: tonic::Code) -> bool {
    !matches!(
        code,
        tonic::Code::InvalidArgument
            | tonic::Code::NotFound
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::FailedPrecondition
            | tonic::Code::Unimplemented
    )
}

/// Waits before each attempt to open the stream again: 200 ms, doubling
/// up to 5 s.
const RECONNECT: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));

/// `false` when Ctrl-C ended the wait.
async fn reconnect(
    session: &Session,
    stream: &mut tonic::Streaming<vpb::WatchAllocationsResponse>,
    request: vpb::WatchAllocationsRequest,
    retry: &mut u32,
) -> bool {
    loop {
        eprintln!("watch: the stream broke; reconnecting…");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return false,
            _ = tokio::time::sleep(RECONNECT.delay(*retry)) => {}
        }
        *retry = retry.saturating_add(1);
        if let Ok(s) = session
            .viewer
            .clone()
            .watch_allocations(request.clone())
            .await
        {
            *stream = s.into_inner();
            return true;
        }
    }
}

/// Moves up over the last drawing and draws the table again.
fn redraw(session: &Session, views: &BTreeMap<String, vpb::AllocationView>, drawn: usize) -> usize {
    let p = &session.print;
    let now = now_secs();
    let rows: Vec<Vec<String>> = views
        .values()
        .filter_map(|v| {
            let a = v.allocation.as_ref()?;
            let state = if v.hold_position > 0 {
                format!("{} #{}", p.state(a.state), v.hold_position)
            } else {
                p.state(a.state)
            };
            Some(vec![
                short_id(&a.allocation_id),
                if a.display_name.is_empty() {
                    "-".into()
                } else {
                    a.display_name.clone()
                },
                state,
                output::resources(a.resources.as_ref()),
                if a.pool.is_empty() {
                    "-".into()
                } else {
                    a.pool.clone()
                },
                relative(a.update_time.as_ref(), now),
            ])
        })
        .collect();
    let text = output::table(
        &["ID", "NAME", "STATE", "RESOURCES", "POOL", "CHANGED"],
        &rows,
        p.headers,
    );
    let mut s = String::new();
    if drawn > 0 {
        s.push_str(&format!("\x1b[{drawn}A"));
    }
    s.push_str("\r\x1b[J");
    s.push_str(&text);
    output::out(&s);
    text.lines().count()
}
