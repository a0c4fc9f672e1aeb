//! The documents run: every command of docs/cookbook.md and of the
//! README's walk-through is executed, in order, against a real mesh with
//! the real grpcurl, so neither can rot.
//!
//! - A `sh` block followed by a `json` or `text` block must print output
//!   of that shape: the same keys, array lengths, integers, enum values and
//!   words; only ids, timestamps and decimals (hours, costs) may differ.
//!   Reads (Get…, List…, CheckQuota) are retried until they match, since
//!   the saga is asynchronous; writes run once.
//! - `<!-- capture: NAME=field -->` before a block sets `$NAME` from the
//!   output's field (a JSON field, or the CLI's `field: value` line); `<!-- webhook: KIND $NAME -->` before a `json` block
//!   compares it with the notification of that kind the viewer sent.
//! - Commands other than grpcurl are the few a user types around it
//!   (`cargo xtask up`/`token`, stopping and starting a service, writing a
//!   file); the runner does what they do. Anything else fails the test.
//!
//! `GPUALLOC_BLESS=1` rewrites the output blocks with what the commands
//! printed (reads are first retried until their enum values match).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use gpualloc_e2e::{Backend, Mesh, Service, Tuning};
use gpualloc_testkit::{HttpReceiver, auth};
use serde_json::Value;

const DEADLINE: Duration = Duration::from_secs(30);

/// A fenced block and the HTML comments just before it.
#[derive(Debug)]
struct Block {
    lang: String,
    body: String,
    /// Line numbers (0-based) of the opening and closing fences.
    open: usize,
    close: usize,
    notes: Vec<String>,
}

fn blocks(md: &str) -> Vec<Block> {
    let lines: Vec<&str> = md.lines().collect();
    let mut out = Vec::new();
    let mut notes = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i].trim();
        if let Some(lang) = line.strip_prefix("```") {
            let open = i;
            let mut body = Vec::new();
            i += 1;
            while i < lines.len() && lines[i].trim() != "```" {
                body.push(lines[i]);
                i += 1;
            }
            out.push(Block {
                lang: lang.trim().to_owned(),
                body: body.join("\n"),
                open,
                close: i,
                notes: std::mem::take(&mut notes),
            });
        } else if let Some(note) = line
            .strip_prefix("<!--")
            .and_then(|l| l.strip_suffix("-->"))
        {
            notes.push(note.trim().to_owned());
        } else if !line.is_empty() {
            notes.clear();
        }
        i += 1;
    }
    out
}

/// One command of a `sh` block, with the comment lines just before it.
#[derive(Debug)]
struct Cmd {
    text: String,
    comments: Vec<String>,
}

fn commands(body: &str) -> Vec<Cmd> {
    let mut out = Vec::new();
    let mut comments = Vec::new();
    let mut current: Vec<&str> = Vec::new();
    let mut heredoc: Option<String> = None;
    for line in body.lines() {
        if let Some(end) = &heredoc {
            current.push(line);
            if line.trim() == end {
                heredoc = None;
                out.push(Cmd {
                    text: current.join("\n"),
                    comments: std::mem::take(&mut comments),
                });
                current.clear();
            }
            continue;
        }
        let t = line.trim();
        if current.is_empty() && (t.is_empty() || t.starts_with('#')) {
            if t.is_empty() {
                comments.clear();
            } else {
                comments.push(t.trim_start_matches('#').trim().to_owned());
            }
            continue;
        }
        current.push(line);
        if let Some((_, rest)) = t.split_once("<<") {
            heredoc = Some(rest.trim().trim_matches('\'').trim_matches('"').to_owned());
            continue;
        }
        if t.ends_with('\\') {
            continue;
        }
        out.push(Cmd {
            text: current.join("\n"),
            comments: std::mem::take(&mut comments),
        });
        current.clear();
    }
    assert!(current.is_empty(), "an unfinished command: {current:?}");
    out
}

/// Ids, timestamps and decimals replaced by placeholders: what may differ
/// between two runs of the same command.
fn normalize(s: &str) -> String {
    let b = s.as_bytes();
    let digit = |i: usize| b.get(i).is_some_and(u8::is_ascii_digit);
    let hex = |i: usize| b.get(i).is_some_and(u8::is_ascii_hexdigit);
    let mut out = String::new();
    let mut i = 0;
    while i < b.len() {
        // 8-4-4-4-12 hex: a UUID.
        let uuid = (0..36).all(|k| {
            if [8, 13, 18, 23].contains(&k) {
                b.get(i + k) == Some(&b'-')
            } else {
                hex(i + k)
            }
        });
        if uuid {
            out.push_str("<uuid>");
            i += 36;
            continue;
        }
        // 2026-11-30T01:02:03[.fff]Z
        let time = (0..19).all(|k| match k {
            4 | 7 => b.get(i + k) == Some(&b'-'),
            10 => b.get(i + k) == Some(&b'T'),
            13 | 16 => b.get(i + k) == Some(&b':'),
            _ => digit(i + k),
        });
        if time {
            let mut j = i + 19;
            if b.get(j) == Some(&b'.') {
                j += 1;
                while digit(j) {
                    j += 1;
                }
            }
            if b.get(j) == Some(&b'Z') {
                j += 1;
            }
            out.push_str("<time>");
            i = j;
            continue;
        }
        // 12.345 (hours, costs, seconds), not part of a word.
        if digit(i) && (i == 0 || !b[i - 1].is_ascii_alphanumeric()) {
            let mut j = i;
            while digit(j) {
                j += 1;
            }
            if b.get(j) == Some(&b'.') && digit(j + 1) {
                j += 1;
                while digit(j) {
                    j += 1;
                }
                out.push_str("<decimal>");
                i = j;
                continue;
            }
        }
        let c = s[i..].chars().next().unwrap_or_default();
        out.push(c);
        i += c.len_utf8();
    }
    out
}

fn is_enum(s: &str) -> bool {
    s.len() > 2
        && s.contains('_')
        && s.bytes()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == b'_')
}

fn enums(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::String(s) if is_enum(s) => out.push(s.clone()),
        Value::Array(a) => a.iter().for_each(|x| enums(x, out)),
        Value::Object(o) => o.values().for_each(|x| enums(x, out)),
        _ => {}
    }
}

fn lengths(v: &Value, out: &mut Vec<usize>) {
    match v {
        Value::Array(a) => {
            out.push(a.len());
            a.iter().for_each(|x| lengths(x, out));
        }
        Value::Object(o) => o.values().for_each(|x| lengths(x, out)),
        _ => {}
    }
}

/// `Ok` when `actual` has the shape of `expected`.
fn same_shape(path: &str, expected: &Value, actual: &Value) -> Result<(), String> {
    match (expected, actual) {
        (Value::Object(e), Value::Object(a)) => {
            let ek: Vec<&String> = e.keys().collect();
            let ak: Vec<&String> = a.keys().collect();
            if ek != ak {
                return Err(format!("{path}: keys {ek:?}, printed {ak:?}"));
            }
            e.iter()
                .try_for_each(|(k, v)| same_shape(&format!("{path}.{k}"), v, &a[k]))
        }
        (Value::Array(e), Value::Array(a)) => {
            if e.len() != a.len() {
                return Err(format!("{path}: {} items, printed {}", e.len(), a.len()));
            }
            e.iter()
                .zip(a)
                .enumerate()
                .try_for_each(|(i, (e, a))| same_shape(&format!("{path}[{i}]"), e, a))
        }
        (Value::String(e), Value::String(a)) if normalize(e) == normalize(a) => Ok(()),
        // Doubles (hours, costs) are decimals too; integers must agree.
        (Value::Number(e), Value::Number(a))
            if !(e.is_i64() || e.is_u64()) || !(a.is_i64() || a.is_u64()) =>
        {
            Ok(())
        }
        (e, a) if e == a => Ok(()),
        (e, a) => Err(format!("{path}: {e}, printed {a}")),
    }
}

fn json_values(text: &str) -> Result<Vec<Value>, String> {
    serde_json::Deserializer::from_str(text)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .map_err(|e| format!("not JSON ({e}):\n{text}"))
}

/// Text as compared: [`normalize`]d, with the CLI's short ids
/// (`01a22a58…2cee`) and relative times (`3s ago`, `in 2h`) replaced and
/// runs of spaces (table alignment follows the widths) made one.
fn text_lines(s: &str) -> Vec<String> {
    normalize(s.trim())
        .lines()
        .map(|l| {
            let words: Vec<String> = l
                .split_whitespace()
                .map(|w| {
                    let short = w.split_once('…').is_some_and(|(a, b)| {
                        a.len() == 8
                            && b.len() == 4
                            && a.bytes().chain(b.bytes()).all(|c| c.is_ascii_hexdigit())
                    });
                    let rel = w.len() > 1
                        && w[..w.len() - 1].bytes().all(|c| c.is_ascii_digit())
                        && w.ends_with(['s', 'm', 'h', 'd']);
                    if short {
                        "<id>".to_owned()
                    } else if rel {
                        "<n>".to_owned()
                    } else {
                        w.to_owned()
                    }
                })
                .collect();
            words.join(" ")
        })
        .collect()
}

/// Where the `gpualloc` binary is: beside this test's own directory
/// (`cargo test --workspace` builds it with the CLI's tests). Looked up
/// and checked once: it walks the CLI's sources.
fn cli_dir() -> PathBuf {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(find_cli).clone()
}

fn find_cli() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap().parent().unwrap().to_owned();
    assert!(
        dir.join("gpualloc").exists(),
        "no gpualloc binary in {}: build it (cargo build -p gpualloc-cli) or run cargo xtask test",
        dir.display()
    );
    // A binary older than the CLI's sources would test old code.
    let built = std::fs::metadata(dir.join("gpualloc"))
        .and_then(|m| m.modified())
        .unwrap();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../cli/src");
    let mut stack = vec![src];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let path = e.path();
            if path.is_dir() {
                stack.push(path);
            } else if e.metadata().and_then(|m| m.modified()).unwrap() > built {
                panic!(
                    "{} is newer than the gpualloc binary: cargo build -p gpualloc-cli",
                    path.display()
                );
            }
        }
    }
    dir
}

/// Whether `printed` has the shape of the block `expected` (`json` or
/// `text`); with `sync_only`, only whether it has the same enum values
/// (or error code), which is what a bless run waits for.
fn matches(lang: &str, expected: &str, printed: &str, sync_only: bool) -> Result<(), String> {
    match lang {
        "json" => {
            let e = json_values(expected)?;
            let a = json_values(printed)?;
            if sync_only {
                // What a hand-written block pins down: its enum values and
                // the lengths of its arrays, where it has any.
                let (mut x, mut y) = (Vec::new(), Vec::new());
                e.iter().for_each(|v| enums(v, &mut x));
                a.iter().for_each(|v| enums(v, &mut y));
                let (mut m, mut n) = (Vec::new(), Vec::new());
                e.iter().for_each(|v| lengths(v, &mut m));
                a.iter().for_each(|v| lengths(v, &mut n));
                return if (x.is_empty() || x == y) && (m.is_empty() || m == n) {
                    Ok(())
                } else {
                    Err(format!(
                        "enums {x:?} and lengths {m:?}, printed {y:?} and {n:?}"
                    ))
                };
            }
            same_shape("$", &Value::Array(e), &Value::Array(a))
        }
        "text" => {
            let (e, a) = (text_lines(expected), text_lines(printed));
            let same = if sync_only && e.iter().any(|l| l.contains("Code:")) {
                e.iter().find(|l| l.contains("Code:")) == a.iter().find(|l| l.contains("Code:"))
            } else if sync_only {
                // A hand-written block: each of its lines appears.
                let printed = a.join("\n");
                e.iter().all(|l| printed.contains(l.as_str()))
            } else {
                e == a
            };
            if same {
                Ok(())
            } else {
                Err(format!(
                    "expected\n{}\nprinted\n{}",
                    e.join("\n"),
                    a.join("\n")
                ))
            }
        }
        other => Err(format!("an output block in {other:?}: use json or text")),
    }
}

/// Runs the commands of a document against one mesh.
struct Runner {
    repo: PathBuf,
    /// The commands' working directory (what `.gpualloc/` and files the
    /// document writes are relative to).
    dir: tempfile::TempDir,
    vars: BTreeMap<String, String>,
    mesh: Option<Mesh>,
    receiver: HttpReceiver,
    bless: bool,
    /// The allocationId of the last CreateAllocation (README's `<id>`).
    last_id: String,
}

/// What a command printed.
struct Printed {
    ok: bool,
    text: String,
}

impl Runner {
    async fn new() -> Runner {
        let dir = tempfile::tempdir().unwrap();
        // The CLI's `local` contexts sign their tokens with the key of the
        // `cargo xtask up` state folder: here, the key the mesh trusts.
        let auth = dir.path().join(".gpualloc/auth");
        std::fs::create_dir_all(&auth).unwrap();
        let key = auth::jwks_path()
            .parent()
            .unwrap()
            .join(gpualloc_auth::DEV_KEY_FILE);
        std::fs::copy(&key, auth.join(gpualloc_auth::DEV_KEY_FILE)).unwrap();
        Runner {
            repo: Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."),
            dir,
            vars: BTreeMap::new(),
            mesh: None,
            receiver: HttpReceiver::start().await,
            bless: std::env::var("GPUALLOC_BLESS").is_ok_and(|v| v == "1"),
            last_id: String::new(),
        }
    }

    async fn start_mesh(&mut self, tuning: Tuning) {
        let mesh = Mesh::start_tuned(Backend::Sqlite, tuning).await;
        self.mesh = Some(mesh);
    }

    fn mesh(&mut self) -> &mut Mesh {
        self.mesh
            .as_mut()
            .expect("a command before `cargo xtask up` started the mesh")
    }

    fn service(&mut self, name: &str) -> &mut Service {
        let mesh = self.mesh();
        match name {
            "allocation" => &mut mesh.allocation,
            "resource-pool" => &mut mesh.pool,
            "viewer" => &mut mesh.viewer,
            other => panic!("no service {other}"),
        }
    }

    /// Runs the non-grpcurl commands a user types around grpcurl; `None`
    /// when `cmd` is a grpcurl call (or writes a file) for the shell.
    async fn builtin(&mut self, cmd: &str) -> Option<Printed> {
        let bare = cmd.split("  #").next().unwrap_or_default().trim();
        let done = Some(Printed {
            ok: true,
            text: String::new(),
        });
        if let Some((name, rest)) = bare.split_once("=$(cargo xtask token ") {
            let token = match rest.trim_end_matches(')').trim() {
                "--admin" => auth::issuer()
                    .token("admin", None, &["admin"], Duration::from_secs(3600))
                    .unwrap(),
                t => {
                    let t = t
                        .strip_prefix("--tenant ")
                        .unwrap_or_else(|| panic!("cargo xtask token {t}?"));
                    auth::issuer()
                        .token(
                            &format!("{t}-user"),
                            Some(t),
                            &[],
                            Duration::from_secs(3600),
                        )
                        .unwrap()
                }
            };
            self.vars.insert(name.trim().to_owned(), token);
            return done;
        }
        if let Some(flags) = bare.strip_prefix("cargo xtask up") {
            assert!(self.mesh.is_none(), "a second `cargo xtask up`");
            let mut tuning = Tuning::default();
            let mut words = flags.split_whitespace();
            while let Some(flag) = words.next() {
                match flag {
                    "--fresh" | "--no-seed" => {}
                    "--rate-card" => {
                        tuning.rate_card = Some(self.repo.join(words.next().unwrap()));
                    }
                    "--notify-config" => {
                        // The document's receiver is played by the test's.
                        let path = self.dir.path().join(words.next().unwrap());
                        let text = std::fs::read_to_string(&path).unwrap().replace(
                            "http://127.0.0.1:8080",
                            self.receiver.url("").trim_end_matches('/'),
                        );
                        std::fs::write(&path, text).unwrap();
                        tuning.notify_config = Some(path);
                    }
                    other => panic!("cargo xtask up {other}: the runner does not know it"),
                }
            }
            assert!(
                flags.contains("--no-seed"),
                "documents start from an empty mesh: `cargo xtask up --fresh --no-seed`"
            );
            self.start_mesh(tuning).await;
            return done;
        }
        if let Some(svc) = bare
            .strip_prefix("kill $(cat .gpualloc/pids/")
            .and_then(|s| s.strip_suffix(".pid)"))
        {
            self.service(svc).stop().await;
            return done;
        }
        if let Some(svc) = bare
            .strip_prefix("sh .gpualloc/run-")
            .and_then(|s| s.strip_suffix(".sh &"))
        {
            let s = self.service(svc);
            s.start_again().await;
            s.wait_serving().await;
            return done;
        }
        if bare.starts_with("grpcurl ")
            || bare.starts_with("gpualloc ")
            || bare.starts_with("cat >")
        {
            return None;
        }
        panic!("the runner does not know how to run {cmd:?}: add it to `builtin`");
    }

    /// The command as the shell runs it here: the mesh's ports for the
    /// documented ones, `<id>` for the last allocation created.
    fn localize(&mut self, cmd: &str) -> String {
        let mut cmd = cmd.replace("<id>", &self.last_id);
        if let Some(mesh) = &self.mesh {
            for (port, s) in [
                ("127.0.0.1:50051", &mesh.allocation),
                ("127.0.0.1:50052", &mesh.pool),
                ("127.0.0.1:50053", &mesh.viewer),
            ] {
                cmd = cmd.replace(port, &s.addr.to_string());
            }
        }
        cmd
    }

    async fn shell(&mut self, cmd: &str) -> Printed {
        let cmd = self.localize(cmd);
        let grpcurl = gpualloc_testkit::grpcurl();
        let cli = cli_dir();
        let path = format!(
            "{}:{}:{}",
            grpcurl.parent().unwrap().display(),
            cli.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let mut vars = self.vars.clone();
        // The CLI finds the mesh where the document says it is.
        if let Some(mesh) = &self.mesh {
            vars.insert("GPUALLOC_ALLOCATION_ADDR".into(), mesh.allocation.url());
            vars.insert("GPUALLOC_RESOURCE_POOL_ADDR".into(), mesh.pool.url());
            vars.insert("GPUALLOC_VIEWER_ADDR".into(), mesh.viewer.url());
        }
        vars.insert(
            "GPUALLOC_CONFIG".into(),
            self.dir.path().join("config.toml").display().to_string(),
        );
        let dir = self.dir.path().to_owned();
        tokio::task::spawn_blocking(move || {
            let out = Command::new("bash")
                .args(["-c", &cmd])
                .current_dir(dir)
                .env("PATH", path)
                .envs(vars)
                .output()
                .unwrap();
            Printed {
                ok: out.status.success(),
                text: format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                ),
            }
        })
        .await
        .unwrap()
    }

    /// Runs `cmd`; with an expected block, until its output matches (reads)
    /// or once (writes). Returns what it printed last.
    async fn run(
        &mut self,
        cmd: &str,
        expect: Option<&Block>,
        claim: Option<&str>,
        at: &str,
    ) -> Printed {
        if let Some(done) = self.builtin(cmd).await {
            return done;
        }
        let read = if cmd.starts_with("gpualloc ") {
            ![
                " create",
                " cancel",
                " approve",
                " reject",
                " renew",
                " put",
                " delete",
                " set",
                " use-context",
            ]
            .iter()
            .any(|w| cmd.contains(w))
        } else {
            ["/Get", "/List", "/CheckQuota"]
                .iter()
                .any(|m| cmd.contains(m))
        };
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let printed = self.shell(cmd).await;
            let verdict = match expect {
                None if printed.ok => Ok(()),
                None => Err("it failed".to_owned()),
                Some(b) => {
                    // A failure shows as grpcurl's `ERROR:` or the CLI's `error:`.
                    let body = b.body.trim_start();
                    let expect_ok = b.lang == "json"
                        || !(body.starts_with("ERROR:") || body.starts_with("error:"));
                    if expect_ok != printed.ok {
                        Err(format!(
                            "success {}, expected {}",
                            printed.ok,
                            if expect_ok { "success" } else { "a failure" }
                        ))
                    } else {
                        matches(&b.lang, &b.body, &printed.text, self.bless)
                    }
                }
            };
            let verdict = verdict.and_then(|()| match claim {
                Some(c) if !printed.text.contains(c) => {
                    Err(format!("the comment before it says {c}"))
                }
                _ => Ok(()),
            });
            match verdict {
                Ok(()) => {
                    if cmd.contains("/CreateAllocation")
                        && let Ok(v) = serde_json::from_str::<Value>(&printed.text)
                        && let Some(id) = v["allocationId"].as_str()
                    {
                        self.last_id = id.to_owned();
                    }
                    if cmd.starts_with("gpualloc ")
                        && cmd.contains(" create")
                        && let Some(id) = printed
                            .text
                            .lines()
                            .find_map(|l| l.strip_prefix("id:").map(str::trim))
                    {
                        self.last_id = id.to_owned();
                    }
                    return printed;
                }
                Err(_) if read && tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(why) => panic!("{at}: {cmd}\n{why}\nit printed:\n{}", printed.text),
            }
        }
    }

    fn capture(&mut self, notes: &[String], printed: &Printed) {
        for note in notes {
            if let Some((name, field)) = note
                .strip_prefix("capture:")
                .and_then(|c| c.trim().split_once('='))
            {
                // The CLI prints `id: …`; grpcurl prints JSON.
                let from_cli = printed.text.lines().find_map(|l| {
                    l.strip_prefix(&format!("{}:", field.trim()))
                        .map(|v| v.trim().to_owned())
                });
                let value = match serde_json::from_str::<Value>(&printed.text) {
                    Ok(v) => v[field.trim()].as_str().map(str::to_owned),
                    Err(_) => from_cli,
                }
                .unwrap_or_else(|| panic!("capture {name}: no {field} in\n{}", printed.text));
                self.vars.insert(name.trim().to_owned(), value);
            }
        }
    }

    /// The notification of `kind` about `$var`, as the receiver got it.
    async fn webhook(&self, kind: &str, var: &str) -> String {
        let id = self.vars[var.trim_start_matches('$')].clone();
        gpualloc_testkit::eventually(DEADLINE, &format!("a {kind} webhook"), || async {
            self.receiver
                .received()
                .into_iter()
                .filter_map(|r| serde_json::from_slice::<Value>(&r.body).ok())
                .find(|b| b["kind"] == kind && b["allocation_id"] == id.as_str())
                .map(|b| serde_json::to_string_pretty(&b).unwrap())
        })
        .await
    }
}

/// Runs every command of `file` (only the blocks after a
/// `<!-- run: … -->` note when `marked`); returns the text, blessed if asked.
async fn run_document(file: &str, marked: bool, runner: &mut Runner) -> (String, String) {
    let path = runner.repo.join(file);
    let md = std::fs::read_to_string(&path).unwrap();
    let all = blocks(&md);
    let mut blessed: Vec<(usize, usize, String)> = Vec::new();
    let mut ran = 0;
    let mut i = 0;
    while i < all.len() {
        let b = &all[i];
        let next = all.get(i + 1).filter(|n| {
            (n.lang == "json" || n.lang == "text")
                && md
                    .lines()
                    .skip(b.close + 1)
                    .take(n.open - b.close - 1)
                    .all(|l| l.trim().is_empty())
        });
        if let Some(webhook) = b.notes.iter().find_map(|n| n.strip_prefix("webhook:")) {
            let (kind, var) = webhook.trim().split_once(' ').unwrap();
            let got = runner.webhook(kind, var).await;
            if runner.bless {
                blessed.push((b.open, b.close, got));
            } else if let Err(why) = matches("json", &b.body, &got, false) {
                panic!("{file}:{}: the {kind} notification\n{why}", b.open + 1);
            }
            i += 1;
            continue;
        }
        let runnable = b.lang == "sh" && (!marked || b.notes.iter().any(|n| n.starts_with("run:")));
        if !runnable {
            i += 1;
            continue;
        }
        let cmds = commands(&b.body);
        if next.is_some() {
            assert_eq!(
                cmds.len(),
                1,
                "{file}:{}: a block followed by its output holds one command",
                b.open + 1
            );
        }
        for c in &cmds {
            let at = format!("{file}:{}", b.open + 1);
            // A claim in the comment before it ("Returns STATE_PENDING")
            // must hold.
            let claim = c
                .comments
                .iter()
                .flat_map(|l| l.split(|ch: char| !(ch.is_ascii_uppercase() || ch == '_')))
                .find(|w| w.starts_with("STATE_") || w.starts_with("VERDICT_"))
                .or_else(|| {
                    c.comments.iter().find_map(|l| {
                        l.split_once("-> ")
                            .and_then(|(_, rest)| rest.split_whitespace().next())
                    })
                });
            let printed = runner.run(&c.text, next, claim, &at).await;
            ran += 1;
            runner.capture(&b.notes, &printed);
            if let (Some(n), true) = (next, runner.bless) {
                blessed.push((n.open, n.close, printed.text.trim_end().to_owned()));
            }
        }
        i += if next.is_some() { 2 } else { 1 };
    }
    assert!(ran > 0, "{file}: nothing ran");
    let mut lines: Vec<String> = md.lines().map(str::to_owned).collect();
    for (open, close, text) in blessed.into_iter().rev() {
        lines.splice(
            open + 1..close,
            text.lines().map(|l| l.trim_end().to_owned()),
        );
    }
    (md, lines.join("\n") + "\n")
}

async fn check(file: &str, marked: bool, mut runner: Runner) {
    let (before, after) = run_document(file, marked, &mut runner).await;
    if runner.bless && before != after {
        std::fs::write(runner.repo.join(file), after).unwrap();
        eprintln!("blessed {file}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_cookbook_command_prints_what_the_cookbook_shows() {
    check("docs/cookbook.md", false, Runner::new().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_readme_walkthrough_runs_as_written() {
    let mut runner = Runner::new().await;
    // The README's walk-through assumes `cargo xtask up` (Quick start).
    runner.start_mesh(Tuning::default()).await;
    check("README.md", true, runner).await;
}

#[test]
fn output_shapes_ignore_ids_times_and_decimals_only() {
    let doc = r#"{"allocationId": "0193a1b2-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "state": "STATE_ALLOCATED",
                 "version": "2", "updateTime": "2026-11-30T01:02:03.456Z", "hours": "0.250"}"#;
    let same = r#"{"allocationId": "0193ffff-c3d4-7e5f-8a9b-0c1d2e3f4a5b", "state": "STATE_ALLOCATED",
                  "version": "2", "updateTime": "2026-12-01T00:00:00Z", "hours": "1.500"}"#;
    assert_eq!(matches("json", doc, same, false), Ok(()));
    for other in [
        same.replace("STATE_ALLOCATED", "STATE_PENDING"),
        same.replace(r#""version": "2""#, r#""version": "3""#),
        same.replace(r#", "hours": "1.500""#, ""),
    ] {
        assert!(matches("json", doc, &other, false).is_err(), "{other}");
    }
    let sh = "# say\ngrpcurl a \\\n  b\ncat > f <<'EOF'\n{\"x\": 1}\nEOF\n";
    let c = commands(sh);
    assert_eq!(c.len(), 2);
    assert_eq!(c[0].comments, ["say"]);
    assert!(c[1].text.ends_with("EOF"));
}
