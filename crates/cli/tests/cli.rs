//! The built `gpualloc` binary against a real mesh: what a user types and
//! what it prints, the JSON it prints checked against the API, `--wait`
//! through HELD to ALLOCATED, exit codes, short ids, contexts and
//! environment overrides; and in a real terminal (tmux), that `watch`
//! redraws in place and `alloc create --wait` stops cleanly on Ctrl-C.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use gpualloc_e2e::{Backend, Mesh, admin, fixtures::*};
use gpualloc_proto::allocation::v1::{self as apb, State};
use gpualloc_testkit::{auth, eventually};

const DEADLINE: Duration = Duration::from_secs(30);

/// The binary with the mesh's addresses and a tenant's token in its
/// environment, and a config file and home of its own.
struct Cli {
    env: Vec<(String, String)>,
    home: tempfile::TempDir,
}

impl Cli {
    fn new(mesh: &Mesh, token: &str) -> Cli {
        let home = tempfile::tempdir().unwrap();
        let env = vec![
            ("GPUALLOC_ALLOCATION_ADDR".into(), mesh.allocation.url()),
            ("GPUALLOC_RESOURCE_POOL_ADDR".into(), mesh.pool.url()),
            ("GPUALLOC_VIEWER_ADDR".into(), mesh.viewer.url()),
            ("GPUALLOC_TOKEN".into(), token.to_owned()),
        ];
        Cli { env, home }
    }

    fn config(&self) -> PathBuf {
        self.home.path().join("config.toml")
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_gpualloc"));
        c.args(args)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("HOME", self.home.path())
            .env("GPUALLOC_CONFIG", self.config())
            // No `cargo xtask up` state folder is found from here.
            .current_dir(self.home.path())
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        c
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Runs on the blocking pool, so the test's runtime keeps serving.
    async fn run_async(&self, args: &[&str]) -> Output {
        let mut c = self.command(args);
        tokio::task::spawn_blocking(move || c.output().unwrap())
            .await
            .unwrap()
    }
}

/// What `child` prints, collected as it comes (the test polls it).
fn collect_stdout(
    child: &mut std::process::Child,
) -> (
    std::sync::Arc<std::sync::Mutex<String>>,
    std::thread::JoinHandle<()>,
) {
    let printed = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut pipe = child.stdout.take().unwrap();
    let sink = printed.clone();
    let reader = std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = std::io::Read::read(&mut pipe, &mut buf) {
            if n == 0 {
                break;
            }
            sink.lock()
                .unwrap()
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    (printed, reader)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "exit {:?}\nstdout:\n{}\nstderr:\n{}",
        o.status.code(),
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

async fn mesh_with_pool(gpus: i32) -> Mesh {
    let mesh = Mesh::start(Backend::Sqlite).await;
    put_pool(&mesh, "p", gpu_capacity(&[("A100", gpus)])).await;
    mesh.pools()
        .set_tenant_quota(admin(
            gpualloc_proto::resourcepool::v1::SetTenantQuotaRequest {
                tenant: "t".into(),
                limits: Some(gpus_res(16)),
                approval_above: Some(gpus_res(6)),
                ..Default::default()
            },
        ))
        .await
        .unwrap();
    mesh
}

fn gpus_res(n: i32) -> gpualloc_proto::resourcepool::v1::Resources {
    gpus(n, "")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_daily_commands_print_tables_and_the_api_messages() {
    let mut mesh = mesh_with_pool(8).await;
    let cli = Cli::new(&mesh, &auth::tenant_token("t"));

    // Create and wait: the steps, then the allocation.
    let out = ok(&cli
        .run_async(&[
            "alloc", "create", "--gpus", "2", "--model", "A100", "--lease", "2h", "--name",
            "run 1", "--label", "team=ml", "--wait",
        ])
        .await);
    assert!(out.contains("PENDING"), "{out}");
    assert!(out.contains("ALLOCATED on pool p"), "{out}");
    assert!(
        out.contains("lease ends:   in 1h") || out.contains("lease ends:   in 2h"),
        "{out}"
    );

    // JSON is the API message: the same as GetAllocation answers.
    let json: serde_json::Value =
        serde_json::from_str(&ok(&cli.run(&["alloc", "list", "-o", "json"]))).unwrap();
    let listed = &json["allocations"][0]["allocation"];
    let id = listed["allocationId"].as_str().unwrap().to_owned();
    let api = get(&mesh, "t", &id).await;
    assert_eq!(listed["state"], "STATE_ALLOCATED");
    assert_eq!(listed["displayName"], "run 1");
    assert_eq!(listed["labels"]["team"], "ml");
    assert_eq!(
        listed["version"],
        api.version.to_string(),
        "int64 as a string, like grpcurl"
    );
    let got: serde_json::Value =
        serde_json::from_str(&ok(&cli.run(&["alloc", "get", &id, "-o", "json"]))).unwrap();
    assert_eq!(got["pool"], api.pool);
    assert!(got["expireTime"].as_str().unwrap().ends_with('Z'), "{got}");
    let yaml = ok(&cli.run(&["alloc", "get", &id, "-o", "yaml"]));
    assert!(yaml.contains("state: STATE_ALLOCATED"), "{yaml}");

    // The table: a short id that works as an argument.
    let table = ok(&cli.run(&["alloc", "list"]));
    let short = format!("{}…{}", &id[..8], &id[id.len() - 4..]);
    assert!(table.starts_with("ID "), "{table}");
    assert!(
        table.contains(&short) && table.contains("ALLOCATED") && table.contains("2×A100"),
        "{table}"
    );
    let wide = ok(&cli.run(&["alloc", "list", "-o", "wide", "--no-headers"]));
    assert!(
        wide.contains(&id) && wide.contains("team=ml") && !wide.contains("RESOURCES"),
        "{wide}"
    );
    assert!(ok(&cli.run(&["alloc", "get", &short])).contains(&id));
    assert!(ok(&cli.run(&["alloc", "get", &id[..20]])).contains(&id));

    // Renew, then history names who renewed.
    let renewed = ok(&cli.run(&["alloc", "renew", &short, "--lease", "5h"]));
    assert!(renewed.contains("lease renewal requested"), "{renewed}");
    eventually(DEADLINE, "the renewal applied", || async {
        (get(&mesh, "t", &id)
            .await
            .reason
            .starts_with("lease renewed"))
        .then_some(())
    })
    .await;
    let history = eventually(DEADLINE, "the renewal in the history", || async {
        let h = ok(&cli.run_async(&["alloc", "history", &short]).await);
        h.contains("lease renewed").then_some(h)
    })
    .await;
    assert!(history.contains("user@t"), "{history}");

    // Pools with free capacity and a bar, the quota, the summary, usage.
    let pools = ok(&cli.run(&["pools", "list"]));
    assert!(
        pools.contains("gpu A100") && pools.contains("[###-------]"),
        "{pools}"
    );
    let quota = ok(&cli.run(&["quota", "get"]));
    assert!(quota.contains("gpus") && quota.contains("> 6"), "{quota}");
    let summary = eventually(DEADLINE, "the summary", || async {
        let s = ok(&cli.run_async(&["summary"]).await);
        s.contains("ALLOCATED").then_some(s)
    })
    .await;
    assert!(summary.contains("2 / 16"), "{summary}");
    let csv = ok(&cli.run(&["usage", "-o", "csv"]));
    assert!(csv.starts_with("tenant,allocation_id,"), "{csv}");
    assert!(csv.contains(&id), "{csv}");
    let usage = ok(&cli.run(&["usage"]));
    assert!(usage.contains("TOTAL"), "{usage}");
    let month = ok(&cli.run(&["usage", "--month", "2026-11", "-o", "json"]));
    assert!(month.contains("\"month\": \"2026-11\""), "{month}");
    let range = ok(&cli.run(&[
        "usage",
        "--from",
        "2020-01-01",
        "--to",
        "2100-01-01",
        "-o",
        "csv",
    ]));
    assert!(range.contains(&id), "{range}");
    let everyone = ok(&Cli::new(&mesh, &auth::admin_token()).run(&["usage", "--all-tenants"]));
    assert!(
        everyone.contains(" t ") || everyone.contains("t   "),
        "{everyone}"
    );
    // What would it cost with these prices: every line priced by the card
    // (cents, per line), the total their sum.
    let card = cli.home.path().join("card.json");
    std::fs::write(&card, r#"{"currency": "CHF", "gpu_hour": {"*": 90000}}"#).unwrap();
    let card = card.display().to_string();
    let priced: serde_json::Value = serde_json::from_str(&ok(&cli.run(&[
        "usage",
        "--rate-card",
        &card,
        "-o",
        "json",
    ])))
    .unwrap();
    assert_eq!(priced["currency"], "CHF");
    let lines = priced["lines"].as_array().unwrap();
    let mut sum = 0.0;
    for l in lines {
        let gpu_hours = l["gpuHours"].as_f64().unwrap_or(0.0);
        let cost = l["cost"].as_f64().unwrap_or(0.0);
        assert!(
            (cost - (gpu_hours * 90000.0 * 100.0).round() / 100.0).abs() < 1e-6,
            "{l}"
        );
        sum += cost;
    }
    assert!(sum > 0.0, "{priced}");
    assert!(
        (priced["totalCost"].as_f64().unwrap() - sum).abs() < 1e-6,
        "{priced}"
    );
    let table = ok(&cli.run(&["usage", "--rate-card", &card]));
    assert!(table.contains("COST (CHF)"), "{table}");
    std::fs::write(
        cli.home.path().join("bad.json"),
        r#"{"currency": "CHF", "cpu_core_hour": -1}"#,
    )
    .unwrap();
    let bad = cli.run(&[
        "usage",
        "--rate-card",
        &cli.home.path().join("bad.json").display().to_string(),
    ]);
    assert_eq!(bad.status.code(), Some(3), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("rate_card"), "{}", stderr(&bad));

    // Every tenant's allocations, for an administrator; and `watch` in a
    // pipe: one line per allocation, no escape sequences.
    let all = ok(&Cli::new(&mesh, &auth::admin_token()).run(&[
        "alloc",
        "list",
        "--all-tenants",
        "-o",
        "wide",
    ]));
    assert!(all.contains(&id) && all.contains(" t "), "{all}");
    let mut watching = cli
        .command(&["watch"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (printed, reader) = collect_stdout(&mut watching);
    let lines_with = |what: String| {
        let printed = printed.clone();
        async move {
            eventually(DEADLINE, &what.clone(), || {
                let printed = printed.clone();
                let what = what.clone();
                async move {
                    let p = printed.lock().unwrap().clone();
                    p.contains(&what).then_some(p)
                }
            })
            .await
        }
    };
    let first = lines_with(format!("{short} ALLOCATED v")).await;
    assert!(!first.contains('\x1b'), "{first:?}");

    // The viewer restarts (a replica in a rolling upgrade): the watch
    // reconnects with what it saw, and goes on without repeating it.
    mesh.viewer.restart().await;
    mesh.viewer.wait_serving().await;

    // Cancel by short id.
    let cancelled = ok(&cli.run(&["alloc", "cancel", &short, "--reason", "done"]));
    assert!(cancelled.contains("CANCELLING"), "{cancelled}");
    wait_state(&mesh, "t", &id, State::Cancelled).await;
    let watched = lines_with(format!("{short} CANCELLED v")).await;
    let _ = watching.kill();
    let _ = watching.wait();
    reader.join().unwrap();
    let mine: Vec<&str> = watched.lines().filter(|l| l.starts_with(&short)).collect();
    assert_eq!(
        mine.iter().filter(|l| l.contains(" ALLOCATED ")).count(),
        1,
        "nothing repeated after the reconnect: {mine:#?}"
    );
    assert!(mine.iter().any(|l| l.contains(" CANCELLING ")), "{mine:#?}");

    // Administrators: put (only what is given changes), get, delete,
    // reject; and the hold queue filtered by model.
    let root = Cli::new(&mesh, &auth::admin_token());
    let put = ok(&root.run(&["pools", "put", "spare", "--gpus", "H100=2", "--cpu", "16"]));
    assert!(
        put.contains("gpu H100") && put.contains("cpu (cores)"),
        "{put}"
    );
    let grown = ok(&root.run(&["pools", "put", "spare", "--gpus", "A100=1"]));
    assert!(
        grown.contains("gpu H100") && grown.contains("gpu A100"),
        "merged: {grown}"
    );
    let got = ok(&root.run(&["pools", "get", "spare", "-o", "json"]));
    let pool: serde_json::Value = serde_json::from_str(&got).unwrap();
    assert_eq!(pool["capacity"]["gpusByModel"]["H100"], 2);
    assert_eq!(pool["capacity"]["cpuMillis"], "16000");
    assert!(ok(&root.run(&["pools", "delete", "spare"])).contains("deleted"));
    assert_eq!(root.run(&["pools", "get", "spare"]).status.code(), Some(4));
    let awaiting = create(&mesh, "t", gpus(7, "A100")).await;
    assert_eq!(awaiting.state, State::AwaitingApproval as i32);
    let rejected = ok(&root.run(&[
        "alloc",
        "reject",
        &awaiting.allocation_id,
        "--reason",
        "use the H100 pool",
    ]));
    assert!(
        rejected.contains("REJECTED") && rejected.contains("use the H100 pool"),
        "{rejected}"
    );
    let none = ok(&cli.run(&["held", "--model", "H100", "--no-headers"]));
    assert!(none.trim().is_empty(), "{none}");
    let view = ok(&cli.run(&["config", "view"]));
    assert!(
        view.contains("context: local") && view.contains(&mesh.viewer.url()),
        "{view}"
    );

    // Completions and the man page come from the same definitions.
    assert!(ok(&cli.run(&["completion", "bash"])).contains("alloc"));
    assert!(ok(&cli.run(&["completion", "zsh"])).contains("#compdef gpualloc"));
    assert!(ok(&cli.run(&["man"])).contains(".TH gpualloc"));
    let help = ok(&cli.run(&["alloc", "create", "--help"]));
    assert!(help.contains("Examples:"), "{help}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wait_follows_the_hold_queue_and_exit_codes_follow_the_status() {
    let mesh = mesh_with_pool(8).await;
    let cli = Cli::new(&mesh, &auth::tenant_token("t"));
    let first = create(&mesh, "t", gpus(6, "A100")).await;
    wait_state(&mesh, "t", &first.allocation_id, State::Allocated).await;

    // Waits through HELD (with its position) to ALLOCATED once room is made.
    let mut waiting = cli
        .command(&[
            "alloc", "create", "--gpus", "4", "--model", "A100", "--wait",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (printed, reader) = collect_stdout(&mut waiting);
    eventually(DEADLINE, "the CLI to show the hold", || async {
        printed
            .lock()
            .unwrap()
            .contains("HELD (position 1")
            .then_some(())
    })
    .await;
    cancel(&mesh, "t", &first.allocation_id).await.unwrap();
    let status = tokio::task::spawn_blocking(move || waiting.wait().unwrap())
        .await
        .unwrap();
    reader.join().unwrap();
    let text = printed.lock().unwrap().clone();
    assert!(status.success(), "{status:?}\n{text}");
    let held = text
        .find("HELD (position 1")
        .unwrap_or_else(|| panic!("{text}"));
    let granted = text
        .find("ALLOCATED on pool p")
        .unwrap_or_else(|| panic!("{text}"));
    assert!(held < granted, "{text}");

    // Rejected while waiting: exit 11.
    let cli2 = Cli::new(&mesh, &auth::tenant_token("t"));
    let big = cli2
        .command(&["alloc", "create", "--gpus", "7", "--wait", "-o", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let awaiting = eventually(DEADLINE, "the request awaiting approval", || async {
        let r = mesh
            .viewer()
            .list_allocation_views(admin(
                gpualloc_proto::viewer::v1::ListAllocationViewsRequest {
                    tenant: "t".into(),
                    states: vec![State::AwaitingApproval as i32],
                    ..Default::default()
                },
            ))
            .await
            .unwrap()
            .into_inner();
        r.allocations.first()?.allocation.clone()
    })
    .await;
    mesh.allocations()
        .reject_allocation(admin(apb::RejectAllocationRequest {
            allocation_id: awaiting.allocation_id.clone(),
            reason: "too big".into(),
        }))
        .await
        .unwrap();
    let out = tokio::task::spawn_blocking(move || big.wait_with_output().unwrap())
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(11), "{}", stderr(&out));
    let last: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(last["state"], "STATE_REJECTED");
    assert!(stderr(&out).contains("too big"), "{}", stderr(&out));

    // NOT_FOUND, UNAUTHENTICATED, PERMISSION_DENIED, FAILED_PRECONDITION,
    // INVALID_ARGUMENT: each its own code and a readable line.
    let missing = cli.run(&["alloc", "get", "01a22a40-0000-7000-8000-000000000000"]);
    assert_eq!(missing.status.code(), Some(4), "{}", stderr(&missing));
    assert!(
        stderr(&missing).starts_with("error: NOT_FOUND"),
        "{}",
        stderr(&missing)
    );
    let stranger = Cli::new(&mesh, "not-a-token");
    let refused = stranger.run(&["alloc", "list"]);
    assert_eq!(refused.status.code(), Some(7), "{}", stderr(&refused));
    let denied = cli.run(&["pools", "delete", "p"]);
    assert_eq!(denied.status.code(), Some(6), "{}", stderr(&denied));
    set_quota(&mesh, "small", gpus(2, "")).await;
    let small = Cli::new(&mesh, &auth::tenant_token("small"));
    let over = small.run(&["alloc", "create", "--gpus", "4"]);
    assert_eq!(over.status.code(), Some(8), "{}", stderr(&over));
    assert!(stderr(&over).contains("quota gpus:"), "{}", stderr(&over));
    let bad = cli.run(&["alloc", "create", "--gpus", "1", "--priority", "5000"]);
    assert_eq!(bad.status.code(), Some(3), "{}", stderr(&bad));
    assert!(stderr(&bad).contains("priority:"), "{}", stderr(&bad));
    let typo = cli.run(&["alloc", "create", "--memory", "64GB"]);
    assert_eq!(typo.status.code(), Some(2), "{}", stderr(&typo));

    // Short ids: an ambiguous prefix names the candidates.
    let ids: Vec<String> = mesh
        .viewer()
        .list_allocation_views(admin(
            gpualloc_proto::viewer::v1::ListAllocationViewsRequest {
                tenant: "t".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .allocations
        .into_iter()
        .filter_map(|v| v.allocation.map(|a| a.allocation_id))
        .collect();
    assert!(ids.len() >= 2);
    let common = common_prefix(&ids[0], &ids[1]);
    let ambiguous = cli.run(&["alloc", "get", &ids[0][..common]]);
    assert_eq!(ambiguous.status.code(), Some(2), "{}", stderr(&ambiguous));
    assert!(
        stderr(&ambiguous).contains("ambiguous"),
        "{}",
        stderr(&ambiguous)
    );
}

fn common_prefix(a: &str, b: &str) -> usize {
    a.bytes()
        .zip(b.bytes())
        .take_while(|(x, y)| x == y)
        .count()
        .max(1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn contexts_and_the_environment_choose_where_and_who() {
    let mesh = mesh_with_pool(4).await;
    let cli = Cli::new(&mesh, &auth::tenant_token("t"));
    create(&mesh, "t", gpus(1, "A100")).await;

    // A context in the config file, chosen with use-context, used without
    // any GPUALLOC_* variable.
    let mut bare = Cli::new(&mesh, "");
    bare.env.clear();
    let token = auth::tenant_token("t");
    ok(&bare.run(&[
        "config",
        "set-context",
        "mesh",
        "--allocation",
        &mesh.allocation.url(),
        "--resource-pool",
        &mesh.pool.url(),
        "--viewer",
        &mesh.viewer.url(),
        "--token-command",
        &format!("echo {token}"),
    ]));
    ok(&bare.run(&["config", "use-context", "mesh"]));
    let contexts = ok(&bare.run(&["config", "get-contexts"]));
    assert!(
        contexts.contains("* mesh") && contexts.contains("  local"),
        "{contexts}"
    );
    let listed = eventually(DEADLINE, "the allocation listed", || async {
        let o = bare.run_async(&["alloc", "list", "--no-headers"]).await;
        let s = ok(&o);
        (!s.trim().is_empty()).then_some(s)
    })
    .await;
    assert!(listed.contains("1×A100"), "{listed}");
    let file = std::fs::read_to_string(bare.config()).unwrap();
    assert!(file.contains("current-context = \"mesh\""), "{file}");

    // The environment beats the context: a bad token from GPUALLOC_TOKEN
    // is used (and refused), another context named by GPUALLOC_CONTEXT.
    let mut overridden = bare.command(&["alloc", "list"]);
    overridden.env("GPUALLOC_TOKEN", "forged");
    let o = overridden.output().unwrap();
    assert_eq!(o.status.code(), Some(7), "{}", stderr(&o));
    let mut unknown = bare.command(&["alloc", "list"]);
    unknown.env("GPUALLOC_CONTEXT", "nowhere");
    let o = unknown.output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("no context \"nowhere\""),
        "{}",
        stderr(&o)
    );
    // And a flag beats the environment.
    let o = cli.run(&["--viewer-addr", "http://127.0.0.1:1", "alloc", "list"]);
    assert_eq!(o.status.code(), Some(10), "{}", stderr(&o));

    // Nothing configured and no `cargo xtask up` state: a clear message.
    let mut nothing = Cli::new(&mesh, "");
    nothing.env.clear();
    let o = nothing.run(&["alloc", "list"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("cargo xtask up"), "{}", stderr(&o));
}

/// A terminal of its own (tmux), `cols` wide.
struct Tmux {
    socket: PathBuf,
    session: String,
}

impl Tmux {
    fn start(dir: &Path, cli: &Cli, args: &str) -> Tmux {
        let socket = dir.join("tmux.sock");
        let session = "cli".to_owned();
        let env: String = cli.env.iter().map(|(k, v)| format!("{k}='{v}' ")).collect();
        let command = format!(
            "env HOME='{}' GPUALLOC_CONFIG='{}' {env} {} {args}; echo EXITED $?; sleep 600",
            cli.home.path().display(),
            cli.config().display(),
            env!("CARGO_BIN_EXE_gpualloc"),
        );
        let status = Command::new("tmux")
            .arg("-S")
            .arg(&socket)
            .args(["new-session", "-d", "-x", "140", "-y", "40", "-s", &session])
            .arg(command)
            .status()
            .unwrap();
        assert!(status.success());
        Tmux { socket, session }
    }

    fn tmux(&self, args: &[&str]) -> String {
        let o = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn screen(&self) -> String {
        self.tmux(&["capture-pane", "-p", "-t", &self.session])
    }

    fn cursor_visible(&self) -> bool {
        self.tmux(&["display", "-p", "-t", &self.session, "#{cursor_flag}"])
            .trim()
            == "1"
    }

    fn ctrl_c(&self) {
        self.tmux(&["send-keys", "-t", &self.session, "C-c"]);
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = Command::new("tmux")
            .arg("-S")
            .arg(&self.socket)
            .arg("kill-server")
            .status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn in_a_terminal_watch_redraws_in_place_and_wait_stops_cleanly() {
    let mesh = mesh_with_pool(2).await;
    let cli = Cli::new(&mesh, &auth::tenant_token("t"));
    let dir = tempfile::tempdir().unwrap();

    let watch = Tmux::start(dir.path(), &cli, "watch");
    let a = create(&mesh, "t", gpus(1, "A100")).await;
    let short = format!(
        "{}…{}",
        &a.allocation_id[..8],
        &a.allocation_id[a.allocation_id.len() - 4..]
    );
    let screen = eventually(DEADLINE, "the watch table with the allocation", || async {
        let s = watch.screen();
        (s.contains(&short) && s.contains("ALLOCATED")).then_some(s)
    })
    .await;
    assert!(
        !watch.cursor_visible(),
        "a live table hides the cursor:\n{screen}"
    );
    cancel(&mesh, "t", &a.allocation_id).await.unwrap();
    let screen = eventually(DEADLINE, "the row redrawn as CANCELLED", || async {
        let s = watch.screen();
        s.contains("CANCELLED").then_some(s)
    })
    .await;
    // Redrawn in place: one header, one row for the allocation.
    assert_eq!(screen.matches("RESOURCES").count(), 1, "{screen}");
    assert_eq!(screen.matches(short.as_str()).count(), 1, "{screen}");
    watch.ctrl_c();
    eventually(DEADLINE, "watch to end on Ctrl-C", || async {
        watch.screen().contains("EXITED 0").then_some(())
    })
    .await;
    assert!(
        watch.cursor_visible(),
        "the cursor is back:\n{}",
        watch.screen()
    );

    // Colour on a terminal (the state is green), none with NO_COLOR.
    let coloured_dir = tempfile::tempdir().unwrap();
    let coloured = Tmux::start(coloured_dir.path(), &cli, "alloc list");
    let mut calm_cli = Cli::new(&mesh, &auth::tenant_token("t"));
    calm_cli.env.push(("NO_COLOR".into(), "1".into()));
    let calm_dir = tempfile::tempdir().unwrap();
    let calm = Tmux::start(calm_dir.path(), &calm_cli, "alloc list");
    for (t, colour) in [(&coloured, true), (&calm, false)] {
        let screen = eventually(DEADLINE, "the list printed", || async {
            let s = t.tmux(&["capture-pane", "-e", "-p", "-t", &t.session]);
            s.contains("EXITED 0").then_some(s)
        })
        .await;
        assert!(screen.contains("CANCELLED"), "{screen:?}");
        assert_eq!(screen.contains("\x1b[2mCANCELLED"), colour, "{screen:?}");
    }

    // create --wait: a spinner while HELD, Ctrl-C stops waiting (130) and
    // leaves the terminal as it was.
    let blocker = create(&mesh, "t", gpus(2, "A100")).await;
    wait_state(&mesh, "t", &blocker.allocation_id, State::Allocated).await;
    let dir2 = tempfile::tempdir().unwrap();
    let wait = Tmux::start(
        dir2.path(),
        &cli,
        "alloc create --gpus 1 --model A100 --wait",
    );
    eventually(DEADLINE, "progress shown", || async {
        let s = wait.screen();
        (s.contains("HELD (position 1") && s.contains("waiting…")).then_some(())
    })
    .await;
    wait.ctrl_c();
    let screen = eventually(DEADLINE, "create --wait to end on Ctrl-C", || async {
        let s = wait.screen();
        s.contains("EXITED 130").then_some(s)
    })
    .await;
    assert!(screen.contains("stopped waiting"), "{screen}");
    assert!(wait.cursor_visible(), "the cursor is back:\n{screen}");
}

/// Each address may list replicas: commands rotate over them and a replica
/// that is down costs nothing but a refused connection; when none answers,
/// the exit code says UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn address_lists_fail_over_to_a_replica_that_answers() {
    let mesh = mesh_with_pool(8).await;
    let dead = || format!("127.0.0.1:{}", gpualloc_testkit::free_port());
    let mut cli = Cli::new(&mesh, &auth::tenant_token("t"));
    for (key, value) in cli.env.iter_mut() {
        if key.ends_with("_ADDR") {
            *value = format!("{},{value}", dead());
        }
    }
    let out = ok(&cli
        .run_async(&[
            "alloc", "create", "--gpus", "1", "--model", "A100", "--wait",
        ])
        .await);
    assert!(out.contains("ALLOCATED on pool p"), "{out}");
    for _ in 0..3 {
        let listed = ok(&cli.run_async(&["alloc", "list"]).await);
        assert!(listed.contains("ALLOCATED"), "{listed}");
    }

    let mut gone = Cli::new(&mesh, &auth::tenant_token("t"));
    for (key, value) in gone.env.iter_mut() {
        if key.ends_with("_ADDR") {
            *value = format!("{},{}", dead(), dead());
        }
    }
    let out = gone.run_async(&["alloc", "list"]).await;
    assert_eq!(out.status.code(), Some(10), "{}", stderr(&out));
}
