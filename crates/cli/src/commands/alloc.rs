//! `gpualloc alloc …`: create (optionally waiting, with a live line of
//! progress), get, list, cancel, approve, reject, renew, history.

use std::{io::Write, time::Duration};

use clap::{Args, Subcommand};
use gpualloc_proto::{allocation::v1 as apb, resourcepool::v1 as rp, viewer::v1 as vpb};

use crate::{
    commands::resolve_id,
    connect::Session,
    exit::{Failure, codes},
    input,
    output::{self, Printer, now_secs, relative, short_id, state_name},
};

#[derive(Debug, Subcommand)]
pub enum Alloc {
    /// Ask for resources.
    #[command(
        after_help = "Examples:\n  gpualloc alloc create --gpus 2 --model A100 --lease 2h --wait\n  \
                            gpualloc alloc create --custom SEAT=3 --name \"keynote\"\n  \
                            gpualloc alloc create --storage 500Gi --lease 1d --label team=data"
    )]
    Create(Create),
    /// Show one allocation.
    #[command(
        after_help = "Example: gpualloc alloc get 01a22a40…0f05   (or any unambiguous prefix)"
    )]
    Get(IdArg),
    /// List allocations (from the viewer).
    #[command(
        after_help = "Examples:\n  gpualloc alloc list --state ALLOCATED,HELD\n  \
                            gpualloc alloc list --selector team=ml -o wide\n  \
                            gpualloc --context local-admin alloc list --all-tenants"
    )]
    List(List),
    /// Cancel: the pool releases what it holds.
    #[command(after_help = "Example: gpualloc alloc cancel 01a22a40…0f05 --reason done")]
    Cancel(WithReason),
    /// Approve one waiting for an administrator (admin).
    #[command(after_help = "Example: gpualloc --context local-admin alloc approve 01a22a40…0f05")]
    Approve(IdArg),
    /// Reject one waiting for an administrator (admin).
    #[command(
        after_help = "Example: gpualloc --context local-admin alloc reject 01a22a40…0f05 --reason \"use the H100 pool\""
    )]
    Reject(WithReason),
    /// Make a lease end later: `lease` from now.
    #[command(after_help = "Example: gpualloc alloc renew 01a22a40…0f05 --lease 2h")]
    Renew(Renew),
    /// Every state change: when, why and who.
    #[command(after_help = "Example: gpualloc alloc history 01a22a40…0f05")]
    History(IdArg),
}

#[derive(Debug, Args)]
pub struct IdArg {
    /// The allocation: its id, an unambiguous prefix, or the short form a table shows.
    pub id: String,
    /// The tenant to look the short id up in (administrators).
    #[arg(long, default_value = "")]
    pub tenant: String,
}

#[derive(Debug, Args)]
pub struct WithReason {
    #[command(flatten)]
    pub id: IdArg,
    /// Why (kept in the history; shown to the tenant).
    #[arg(long, default_value = "")]
    pub reason: String,
}

#[derive(Debug, Args)]
pub struct Renew {
    #[command(flatten)]
    pub id: IdArg,
    /// How long from now the lease should last (90s, 30m, 2h, 1d).
    #[arg(long, value_parser = input::duration_secs)]
    pub lease: i64,
}

#[derive(Debug, Args)]
pub struct Create {
    #[command(flatten)]
    pub amounts: super::Amounts,
    /// GPUs.
    #[arg(long, default_value_t = 0)]
    pub gpus: i32,
    /// GPU model (A100, H100…); any model when left out.
    #[arg(long, default_value = "")]
    pub model: String,
    /// Release it this long after it is granted (90s, 30m, 2h, 1d).
    #[arg(long, value_parser = input::duration_secs)]
    pub lease: Option<i64>,
    /// Hold-queue priority, 0 to 1000 (higher goes first).
    #[arg(long, default_value_t = 0)]
    pub priority: i32,
    /// A label: KEY=VALUE (repeatable).
    #[arg(long = "label", value_parser = input::pair)]
    pub labels: Vec<(String, String)>,
    /// A name for people.
    #[arg(long, default_value = "")]
    pub name: String,
    /// Idempotency key: the same key returns the same allocation.
    #[arg(long, default_value = "")]
    pub request_id: String,
    /// The tenant to charge (administrators); the token's tenant otherwise.
    #[arg(long, default_value = "")]
    pub tenant: String,
    /// Follow it until it is ALLOCATED or ends; exit 11 if it is not granted.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Debug, Args)]
pub struct List {
    /// A tenant (administrators); the token's tenant otherwise.
    #[arg(long, default_value = "")]
    pub tenant: String,
    /// Every tenant (administrators).
    #[arg(long, conflicts_with = "tenant")]
    pub all_tenants: bool,
    /// Only these states: ALLOCATED,HELD,…
    #[arg(long, value_delimiter = ',')]
    pub state: Vec<String>,
    /// Labels that must match: key=value[,key=value].
    #[arg(long, default_value = "")]
    pub selector: String,
    /// At most this many.
    #[arg(long, default_value_t = 500)]
    pub limit: usize,
}

pub async fn run(session: &Session, cmd: Alloc) -> Result<(), Failure> {
    let mut client = session.allocations.clone();
    let p = &session.print;
    match cmd {
        Alloc::Create(c) => create(session, c).await,
        Alloc::Get(a) => {
            let id = resolve_id(session, &a.id, &a.tenant).await?;
            let got = client
                .get_allocation(apb::GetAllocationRequest { allocation_id: id })
                .await?
                .into_inner();
            show(p, &got)
        }
        Alloc::List(l) => list(session, l).await,
        Alloc::Cancel(c) => {
            let id = resolve_id(session, &c.id.id, &c.id.tenant).await?;
            let a = client
                .cancel_allocation(apb::CancelAllocationRequest {
                    allocation_id: id,
                    reason: c.reason,
                })
                .await?
                .into_inner();
            show(p, &a)
        }
        Alloc::Approve(a) => {
            let id = resolve_id(session, &a.id, &a.tenant).await?;
            let a = client
                .approve_allocation(apb::ApproveAllocationRequest { allocation_id: id })
                .await?
                .into_inner();
            show(p, &a)
        }
        Alloc::Reject(r) => {
            let id = resolve_id(session, &r.id.id, &r.id.tenant).await?;
            let a = client
                .reject_allocation(apb::RejectAllocationRequest {
                    allocation_id: id,
                    reason: r.reason,
                })
                .await?
                .into_inner();
            show(p, &a)
        }
        Alloc::Renew(r) => {
            let id = resolve_id(session, &r.id.id, &r.id.tenant).await?;
            let a = client
                .renew_allocation(apb::RenewAllocationRequest {
                    allocation_id: id,
                    lease: Some(prost_types::Duration {
                        seconds: r.lease,
                        nanos: 0,
                    }),
                })
                .await?
                .into_inner();
            show(p, &a)
        }
        Alloc::History(a) => {
            let id = resolve_id(session, &a.id, &a.tenant).await?;
            let h = session
                .viewer
                .clone()
                .list_allocation_history(vpb::ListAllocationHistoryRequest { allocation_id: id })
                .await?
                .into_inner();
            if p.raw() {
                return p.message(&h);
            }
            let now = now_secs();
            let rows: Vec<Vec<String>> = h
                .entries
                .iter()
                .map(|e| {
                    let from = if e.previous_state == 0 {
                        "-".to_owned()
                    } else {
                        state_name(e.previous_state).to_owned()
                    };
                    vec![
                        e.version.to_string(),
                        relative(e.change_time.as_ref(), now),
                        from,
                        p.state(e.state),
                        if e.actor.is_empty() {
                            "-".into()
                        } else {
                            e.actor.clone()
                        },
                        e.reason.clone(),
                    ]
                })
                .collect();
            p.table(&["VERSION", "WHEN", "FROM", "TO", "BY", "REASON"], &rows);
            Ok(())
        }
    }
}

fn resources_of(c: &Create) -> rp::Resources {
    rp::Resources {
        cpu_millis: c.amounts.cpu.unwrap_or(0),
        memory_mib: c.amounts.memory.unwrap_or(0),
        gpus: c.gpus,
        gpu_model: c.model.clone(),
        storage_gib: c.amounts.storage.unwrap_or(0),
        custom: c.amounts.custom.iter().cloned().collect(),
    }
}

async fn create(session: &Session, c: Create) -> Result<(), Failure> {
    let request = apb::CreateAllocationRequest {
        tenant: c.tenant.clone(),
        resources: Some(resources_of(&c)),
        request_id: c.request_id.clone(),
        priority: c.priority,
        lease: c.lease.map(|s| prost_types::Duration {
            seconds: s,
            nanos: 0,
        }),
        labels: c.labels.iter().cloned().collect(),
        display_name: c.name.clone(),
    };
    let created = session
        .allocations
        .clone()
        .create_allocation(request)
        .await?
        .into_inner();
    if !c.wait {
        return show(&session.print, &created);
    }
    let last = wait(session, created).await?;
    show(&session.print, &last)?;
    match apb::State::try_from(last.state) {
        Ok(apb::State::Allocated) => Ok(()),
        _ => Err(Failure {
            code: codes::NOT_GRANTED,
            message: format!(
                "allocation {} is {}: {}",
                short_id(&last.allocation_id),
                state_name(last.state),
                last.reason
            ),
            details: Vec::new(),
        }),
    }
}

/// One line about where an allocation stands, for people.
async fn progress_line(session: &Session, a: &apb::Allocation) -> String {
    match apb::State::try_from(a.state) {
        Ok(apb::State::Held) => {
            let held = session
                .pools
                .clone()
                .list_held(rp::ListHeldRequest {
                    pool_id: String::new(),
                    tenant: a.tenant.clone(),
                })
                .await
                .map(|r| r.into_inner().held)
                .unwrap_or_default();
            match held.iter().find(|h| h.allocation_id == a.allocation_id) {
                Some(h) => {
                    let start = h
                        .estimated_start_time
                        .as_ref()
                        .map(|t| format!(", est. start {}", relative(Some(t), now_secs())))
                        .unwrap_or_default();
                    format!("HELD (position {}{start})", h.position)
                }
                None => "HELD".into(),
            }
        }
        Ok(apb::State::Allocated) => format!("ALLOCATED on pool {}", a.pool),
        Ok(apb::State::AwaitingApproval) => "AWAITING_APPROVAL (an administrator decides)".into(),
        Ok(apb::State::Rejected | apb::State::Cancelled | apb::State::Expired) => {
            format!("{}: {}", state_name(a.state), a.reason)
        }
        _ => state_name(a.state).to_owned(),
    }
}

/// Follows `a` until it is ALLOCATED or has ended, showing each step (a
/// spinner on a terminal, one line per step otherwise); Ctrl-C stops.
async fn wait(session: &Session, mut a: apb::Allocation) -> Result<apb::Allocation, Failure> {
    // Progress goes to stderr when stdout carries JSON or YAML.
    let to_err = session.print.raw();
    let tty = if to_err {
        std::io::IsTerminal::is_terminal(&std::io::stderr())
    } else {
        session.print.tty
    };
    let say = |line: &str| {
        if to_err {
            eprintln!("{line}");
        } else {
            output::out(&format!("{line}\n"));
        }
    };
    let raw = |s: &str| {
        if to_err {
            eprint!("{s}");
            let _ = std::io::stderr().flush();
        } else {
            output::out(s);
        }
    };
    let mut shown = String::new();
    let frames = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
    let mut tick = 0usize;
    if tty {
        raw("\x1b[?25l");
    }
    let result = loop {
        let line = progress_line(session, &a).await;
        if line != shown {
            if tty {
                raw("\r\x1b[2K");
            }
            say(&format!("{}  {line}", short_id(&a.allocation_id)));
            shown = line;
        }
        let state = apb::State::try_from(a.state).unwrap_or(apb::State::Unspecified);
        if matches!(
            state,
            apb::State::Allocated
                | apb::State::Rejected
                | apb::State::Cancelled
                | apb::State::Expired
        ) {
            break Ok(a);
        }
        if tty {
            raw(&format!(
                "\r\x1b[2K{} waiting…",
                frames[tick % frames.len()]
            ));
            tick += 1;
        }
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                break Err(Failure {
                    code: codes::INTERRUPTED,
                    message: format!(
                        "stopped waiting; allocation {} is {} (it carries on)",
                        short_id(&a.allocation_id),
                        state_name(a.state)
                    ),
                    details: Vec::new(),
                });
            }
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        a = session
            .allocations
            .clone()
            .get_allocation(apb::GetAllocationRequest {
                allocation_id: a.allocation_id.clone(),
            })
            .await?
            .into_inner();
    };
    if tty {
        raw("\r\x1b[2K\x1b[?25h");
    }
    result
}

async fn list(session: &Session, l: List) -> Result<(), Failure> {
    let p = &session.print;
    let mut states = Vec::new();
    for s in &l.state {
        let name = format!("STATE_{}", s.trim().to_uppercase());
        let state = apb::State::from_str_name(&name)
            .ok_or_else(|| Failure::usage(format!("{s:?} is not a state")))?;
        states.push(state as i32);
    }
    let tenant = if l.all_tenants {
        String::new()
    } else {
        l.tenant.clone()
    };
    let mut viewer = session.viewer.clone();
    let mut all = vpb::ListAllocationViewsResponse::default();
    let mut page_token = String::new();
    loop {
        let page = viewer
            .list_allocation_views(vpb::ListAllocationViewsRequest {
                tenant: tenant.clone(),
                states: states.clone(),
                page_size: 500,
                page_token: page_token.clone(),
                label_selector: l.selector.clone(),
            })
            .await?
            .into_inner();
        all.allocations.extend(page.allocations);
        if page.next_page_token.is_empty() || all.allocations.len() >= l.limit {
            break;
        }
        page_token = page.next_page_token;
    }
    all.allocations.truncate(l.limit);
    if p.raw() {
        return p.message(&all);
    }
    let now = now_secs();
    let mut rows = Vec::new();
    for v in &all.allocations {
        let Some(a) = &v.allocation else { continue };
        let state = if v.hold_position > 0 {
            format!("{} #{}", p.state(a.state), v.hold_position)
        } else {
            p.state(a.state)
        };
        let mut row = vec![
            if p.wide() {
                a.allocation_id.clone()
            } else {
                short_id(&a.allocation_id)
            },
            dash(&a.display_name),
            state,
            output::resources(a.resources.as_ref()),
            dash(&a.pool),
            relative(a.create_time.as_ref(), now),
            relative(a.expire_time.as_ref(), now),
        ];
        if p.wide() {
            let mut labels: Vec<String> =
                a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
            labels.sort();
            row.extend([
                a.tenant.clone(),
                a.priority.to_string(),
                a.version.to_string(),
                dash(&labels.join(",")),
            ]);
        }
        rows.push(row);
    }
    let mut columns = vec!["ID", "NAME", "STATE", "RESOURCES", "POOL", "AGE", "ENDS"];
    if p.wide() {
        columns.extend(["TENANT", "PRIORITY", "VERSION", "LABELS"]);
    }
    p.table(&columns, &rows);
    Ok(())
}

fn dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.to_owned()
    }
}

/// One allocation: the message (JSON, YAML) or its fields, one per line.
pub fn show(p: &Printer, a: &apb::Allocation) -> Result<(), Failure> {
    if p.raw() {
        return p.message(a);
    }
    let now = now_secs();
    let mut labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    let fields: Vec<(&str, String)> = vec![
        ("id", a.allocation_id.clone()),
        ("name", dash(&a.display_name)),
        ("tenant", a.tenant.clone()),
        ("state", p.state(a.state)),
        ("reason", dash(&a.reason)),
        ("resources", output::resources(a.resources.as_ref())),
        ("pool", dash(&a.pool)),
        ("priority", a.priority.to_string()),
        ("labels", dash(&labels.join(","))),
        ("created", relative(a.create_time.as_ref(), now)),
        ("lease ends", relative(a.expire_time.as_ref(), now)),
        ("ended", relative(a.end_time.as_ref(), now)),
        ("version", a.version.to_string()),
    ];
    let rows: Vec<Vec<String>> = fields
        .into_iter()
        .filter(|(k, v)| p.wide() || !(v == "-" && *k != "state"))
        .map(|(k, v)| vec![format!("{k}:"), v])
        .collect();
    output::out(&output::table(&["", ""], &rows, false));
    Ok(())
}
