//! `cargo xtask up`: the whole mesh on this machine. NATS (JetStream, data
//! under the state folder) and each service as its own process, so that one
//! can be stopped and the others watched coping; SQLite files under the
//! state folder, or PostgreSQL with `--database`.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use gpualloc_auth::DevIssuer;
use gpualloc_proto::resourcepool::v1::{
    self as rp, resource_pool_service_client::ResourcePoolServiceClient,
};
use tonic::{Request, metadata::MetadataValue, transport::Channel};
use tonic_health::pb::{
    HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
};

use crate::{
    install,
    procs::{self, Guard},
};

#[derive(clap::Args)]
pub struct Args {
    /// Where databases, NATS data and logs live.
    #[arg(long, default_value = ".gpualloc")]
    state_dir: PathBuf,
    /// Wipe the state folder first.
    #[arg(long)]
    fresh: bool,
    /// Prices for the viewer's usage reports (a JSON rate card, see
    /// docs/operations.md); reports carry no costs without one.
    #[arg(long)]
    rate_card: Option<PathBuf>,
    /// Where the viewer sends notifications (webhook, Slack, KakaoTalk; a
    /// JSON settings file, see docs/notifications.md).
    #[arg(long)]
    notify_config: Option<PathBuf>,
    /// Do not create the demo pools and quota (they are only ever created
    /// when missing; this skips even that).
    #[arg(long)]
    no_seed: bool,
    /// Use PostgreSQL (e.g. postgres://postgres@127.0.0.1:5432/gpualloc):
    /// one database per service, named <database>_<service>, created if
    /// missing.
    #[arg(long)]
    database: Option<String>,
    /// Use this NATS server (with JetStream) instead of starting one.
    #[arg(long)]
    nats: Option<String>,
    /// Build and run release binaries.
    #[arg(long)]
    release: bool,
    /// Processes of each service, on ports 10 apart (allocation 50051,
    /// 50061, …); 2 or more need `--database postgres://…`.
    #[arg(long, default_value_t = 1)]
    replicas: usize,
    /// Start a local JetStream cluster of this many nodes (3 or 5) instead
    /// of one server; the stream gets as many replicas.
    #[arg(long, conflicts_with = "nats")]
    nats_cluster: Option<usize>,
    /// Export traces over OTLP/gRPC to this collector (e.g. Jaeger's
    /// http://127.0.0.1:4317); `OTEL_EXPORTER_OTLP_ENDPOINT` works too.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    otlp: Option<String>,
}

struct Svc {
    name: &'static str,
    binary: &'static str,
    port: u16,
    metrics_port: u16,
    db_suffix: &'static str,
}

/// One process of one service.
#[derive(Debug, PartialEq)]
struct Proc {
    svc: usize,
    replica: usize,
    /// `allocation`, `allocation-1`, …: its log, PID file and run script.
    name: String,
    port: u16,
    metrics_port: u16,
}

/// The processes `--replicas` asks for, or why not.
fn plan(replicas: usize, database: Option<&str>) -> anyhow::Result<Vec<Proc>> {
    if !(1..=9).contains(&replicas) {
        bail!("--replicas takes 1 to 9");
    }
    if replicas > 1 && database.is_none() {
        bail!(
            "--replicas {replicas} needs --database postgres://…: the replicas of a service share its database, and a SQLite file belongs to one process"
        );
    }
    Ok(SERVICES
        .iter()
        .enumerate()
        .flat_map(|(i, svc)| {
            (0..replicas).map(move |r| Proc {
                svc: i,
                replica: r,
                name: if r == 0 {
                    svc.name.to_owned()
                } else {
                    format!("{}-{r}", svc.name)
                },
                port: svc.port + 10 * r as u16,
                metrics_port: svc.metrics_port + 10 * r as u16,
            })
        })
        .collect())
}

/// Comma-separated `host:port` of every process of service `svc`.
fn addrs(procs: &[Proc], svc: usize) -> String {
    procs
        .iter()
        .filter(|p| p.svc == svc)
        .map(|p| format!("127.0.0.1:{}", p.port))
        .collect::<Vec<_>>()
        .join(",")
}

const SERVICES: [Svc; 3] = [
    Svc {
        name: "resource-pool",
        binary: "gpualloc-resource-pool",
        port: 50052,
        metrics_port: 9092,
        db_suffix: "resource_pool",
    },
    Svc {
        name: "allocation",
        binary: "gpualloc-allocation",
        port: 50051,
        metrics_port: 9091,
        db_suffix: "allocation",
    },
    Svc {
        name: "viewer",
        binary: "gpualloc-viewer",
        port: 50053,
        metrics_port: 9093,
        db_suffix: "viewer",
    },
];

fn database_url(args: &Args, state: &Path, svc: &Svc) -> anyhow::Result<String> {
    match &args.database {
        None => Ok(format!(
            "sqlite://{}",
            state.join(format!("{}.db", svc.name)).display()
        )),
        Some(url) => {
            if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
                bail!("--database must be a postgres:// URL (SQLite is the default)");
            }
            let (base, query) = url
                .split_once('?')
                .map_or((url.as_str(), None), |(b, q)| (b, Some(q)));
            let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
            let (server, name) = match base[scheme_end..].find('/') {
                Some(i) => (&base[..scheme_end + i], &base[scheme_end + i + 1..]),
                None => (base, ""),
            };
            let name = if name.is_empty() { "gpualloc" } else { name };
            let mut out = format!("{server}/{name}_{}", svc.db_suffix);
            if let Some(q) = query {
                out.push('?');
                out.push_str(q);
            }
            Ok(out)
        }
    }
}

/// The state folder, relative paths taken from the workspace root (so that
/// `up` and `token` agree wherever they are run from).
pub fn state_dir(arg: &Path) -> PathBuf {
    if arg.is_absolute() {
        arg.to_owned()
    } else {
        crate::root().join(arg)
    }
}

/// The development issuer kept under the state folder: its key signs the
/// tokens of `cargo xtask token`, its JWKS is what the services trust.
pub fn dev_issuer(state: &Path) -> anyhow::Result<DevIssuer> {
    DevIssuer::load_or_create(&state.join("auth")).map_err(anyhow::Error::msg)
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let root = crate::root();
    let state = state_dir(&args.state_dir);
    if args.fresh && state.exists() {
        eprintln!("xtask: wiping {}", state.display());
        fs::remove_dir_all(&state)?;
    }
    fs::create_dir_all(state.join("logs"))?;
    fs::create_dir_all(state.join("pids"))?;
    let issuer = dev_issuer(&state)?;
    let plan = plan(args.replicas, args.database.as_deref())?;
    if let Some(n) = args.nats_cluster
        && !(n == 3 || n == 5)
    {
        bail!("--nats-cluster takes 3 or 5 (a JetStream cluster needs a majority)");
    }
    for p in &plan {
        if !procs::port_free(p.port) {
            let holder = procs::holder_of(p.port).map_or_else(
                || "by a process this user cannot see".to_owned(),
                |h| format!("by {h}"),
            );
            bail!(
                "port {} ({}) is taken {holder}: another `cargo xtask up`, or a service started by hand with run-{}.sh? Stop it (kill <PID>) and run again",
                p.port,
                p.name,
                p.name,
            );
        }
    }

    install::libpq()?;
    let profile = if args.release { "release" } else { "debug" };
    let mut build = crate::cargo();
    build
        .current_dir(&root)
        .args(["build", "--workspace", "--bins"]);
    if args.release {
        build.arg("--release");
    }
    procs::run("building the services", &mut build)?;

    let mut children: Vec<Guard> = Vec::new();
    let nats_passwords = nats_passwords(&state.join("nats"))?;
    let nats_url = match (&args.nats, args.nats_cluster) {
        (Some(url), _) => url.clone(),
        (None, Some(members)) => nats_cluster(&state, members, &nats_passwords, &mut children)?,
        (None, None) => {
            let bin = install::nats_server()?;
            let port = if procs::port_free(4222) {
                4222
            } else {
                procs::free_port()?
            };
            // Each service its own user and publish allow-list; no
            // anonymous access (see docs/security.md).
            let conf = state.join("nats/nats.conf");
            write_private(&conf, nats_conf(&state, port, &nats_passwords).as_bytes())?;
            let mut cmd = Command::new(bin);
            cmd.arg("-c")
                .arg(&conf)
                .arg("-l")
                .arg(state.join("logs/nats.log"));
            children.push(Guard::spawn("nats-server", &mut cmd)?);
            procs::wait_port(port, Duration::from_secs(20), "nats-server")?;
            format!("nats://127.0.0.1:{port}")
        }
    };

    // Every allocation replica knows every pool replica.
    let pool_url: String = addrs(&plan, 0)
        .split(',')
        .map(|a| format!("http://{a}"))
        .collect::<Vec<_>>()
        .join(",");
    for p in &plan {
        let svc = &SERVICES[p.svc];
        let binary = root.join("target").join(profile).join(svc.binary);
        let mut env = vec![
            ("GPUALLOC_LISTEN", format!("127.0.0.1:{}", p.port)),
            ("GPUALLOC_DATABASE_URL", database_url(&args, &state, svc)?),
            ("GPUALLOC_CREATE_DATABASE", "true".into()),
            ("GPUALLOC_NATS_URL", nats_url.clone()),
            ("GPUALLOC_RESOURCE_POOL_URL", pool_url.clone()),
            (
                "GPUALLOC_JWKS",
                DevIssuer::jwks_path(&state.join("auth"))
                    .display()
                    .to_string(),
            ),
        ];
        if args.replicas > 1 {
            // Stable across restarts: a restarted replica publishes the
            // outbox rows it left behind at once.
            env.push(("GPUALLOC_REPLICA_ID", p.name.clone()));
            env.push((
                "GPUALLOC_METRICS_LISTEN",
                format!("127.0.0.1:{}", p.metrics_port),
            ));
            // Leave the balance a second before refusing connections.
            env.push(("GPUALLOC_SHUTDOWN_DELAY", "1s".into()));
        }
        if let Some(members) = args.nats_cluster {
            env.push(("GPUALLOC_STREAM_REPLICAS", members.to_string()));
        }
        if args.nats.is_none() {
            env.push(("GPUALLOC_NATS_USER", svc.name.to_owned()));
            env.push(("GPUALLOC_NATS_PASSWORD", nats_passwords[svc.name].clone()));
        }
        if svc.name == "viewer"
            && let Some(card) = &args.rate_card
        {
            let card = fs::canonicalize(card)
                .with_context(|| format!("the rate card {}", card.display()))?;
            env.push(("GPUALLOC_RATE_CARD", card.display().to_string()));
        }
        if svc.name == "viewer"
            && let Some(settings) = &args.notify_config
        {
            let settings = fs::canonicalize(settings)
                .with_context(|| format!("the notification settings {}", settings.display()))?;
            env.push(("GPUALLOC_NOTIFY_CONFIG", settings.display().to_string()));
        }
        if let Some(otlp) = &args.otlp {
            env.push(("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.clone()));
        }
        // A script to start this one service again by hand after stopping it.
        let log = state.join("logs").join(format!("{}.log", p.name));
        // It registers its PID (kept by `exec`) so that this `up` stops
        // it on Ctrl-C like the processes it started itself.
        let pid_file = state.join("pids").join(format!("{}.pid", p.name));
        let script: String = std::iter::once("#!/bin/sh\n".to_owned())
            .chain(env.iter().map(|(k, v)| format!("export {k}='{v}'\n")))
            .chain([
                format!("echo $$ >'{}'\n", pid_file.display()),
                format!("exec '{}' >>'{}' 2>&1\n", binary.display(), log.display()),
            ])
            .collect();
        // It holds the service's NATS password: readable by its owner only.
        let run_script = state.join(format!("run-{}.sh", p.name));
        let _ = fs::remove_file(&run_script);
        write_private(&run_script, script.as_bytes())?;
        let out = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = Command::new(&binary);
        cmd.envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = Guard::spawn(&p.name, &mut cmd)?;
        // Registered like a run-script start, so that
        // `kill $(cat .gpualloc/pids/<service>.pid)` stops either.
        fs::write(&pid_file, format!("{}\n", child.pid()))?;
        children.push(child);
    }

    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let outcome = runtime.block_on(async {
        for p in &plan {
            wait_serving(p).await?;
        }
        let admin_token = issuer
            .token("xtask", None, &["admin"], BANNER_TTL)
            .map_err(anyhow::Error::msg)?;
        if !args.no_seed {
            seed(&pool_url, &admin_token).await?;
        }
        let tenant_token = issuer
            .token("demo-user", Some("demo"), &[], BANNER_TTL)
            .map_err(anyhow::Error::msg)?;
        print_banner(
            &state,
            &nats_url,
            &plan,
            &children,
            &tenant_token,
            &admin_token,
        );
        supervise(&mut children).await;
        Ok::<_, anyhow::Error>(())
    });
    eprintln!("\nxtask: stopping the services, then NATS");
    // Services first (they flush their outboxes to NATS), NATS last;
    // services restarted by hand with their run script are services too.
    let own: Vec<String> = children.iter().map(|c| c.pid().to_string()).collect();
    for p in &plan {
        let svc = &SERVICES[p.svc];
        let pid_file = state.join("pids").join(format!("{}.pid", p.name));
        // Our own child is stopped below (and reaped, which a kill of a
        // PID alone cannot do).
        let registered = fs::read_to_string(&pid_file).unwrap_or_default();
        if own.iter().any(|p| p == registered.trim()) {
            let _ = fs::remove_file(&pid_file);
            continue;
        }
        if let Some(pid) = procs::stop_registered(&pid_file, svc.binary, Duration::from_secs(30)) {
            eprintln!(
                "xtask: stopped {} (PID {pid}, started with run-{}.sh)",
                svc.binary, p.name
            );
        }
    }
    for child in children.iter_mut().rev() {
        child.stop(Duration::from_secs(30));
    }
    outcome
}

/// The NATS users' passwords, made once and kept under `dir` (readable by
/// the owner only), so restarts and `run-<service>.sh` keep working.
fn nats_passwords(dir: &Path) -> anyhow::Result<std::collections::BTreeMap<&'static str, String>> {
    fs::create_dir_all(dir)?;
    let mut out = std::collections::BTreeMap::new();
    for user in [
        gpualloc_nats_acl::ALLOCATION,
        gpualloc_nats_acl::RESOURCE_POOL,
        gpualloc_nats_acl::VIEWER,
        gpualloc_nats_acl::OPERATOR,
    ] {
        let path = dir.join(format!("{user}.password"));
        let password = match fs::read_to_string(&path) {
            Ok(p) => p.trim().to_owned(),
            Err(_) => {
                let mut bytes = [0u8; 18];
                std::io::Read::read_exact(&mut fs::File::open("/dev/urandom")?, &mut bytes)?;
                let p: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
                write_private(&path, p.as_bytes())?;
                p
            }
        };
        out.insert(user, password);
    }
    Ok(out)
}

/// A local JetStream cluster: `members` nats-servers on loopback (client
/// ports from 4222, cluster ports from 6222, monitoring from 8222), each
/// with its data under the state folder; returns every member's URL.
fn nats_cluster(
    state: &Path,
    members: usize,
    passwords: &std::collections::BTreeMap<&'static str, String>,
    children: &mut Vec<Guard>,
) -> anyhow::Result<String> {
    use gpualloc_nats_acl::{Cluster, Secret, ServerSettings};
    let bin = install::nats_server()?;
    let users = gpualloc_nats_acl::users("gpualloc", "GPUALLOC", |name| {
        Secret::Password(passwords.get(name).cloned().unwrap_or_default())
    });
    let mut ports: Vec<(u16, u16, u16)> = (0..members as u16)
        .map(|k| (4222 + k, 6222 + k, 8222 + k))
        .collect();
    // The usual ports when they are free (a NATS of the machine's own
    // often holds 4222), else any.
    if ports
        .iter()
        .any(|(c, r, m)| [c, r, m].iter().any(|p| !procs::port_free(**p)))
    {
        ports = (0..members)
            .map(|_| {
                Ok((
                    procs::free_port()?,
                    procs::free_port()?,
                    procs::free_port()?,
                ))
            })
            .collect::<anyhow::Result<_>>()?;
    }
    let routes: Vec<String> = ports
        .iter()
        .map(|(_, c, _)| format!("nats://127.0.0.1:{c}"))
        .collect();
    for (k, (client, cluster, monitor)) in ports.iter().enumerate() {
        let name = format!("nats-{k}");
        let dir = state.join("nats").join(&name);
        fs::create_dir_all(&dir)?;
        let conf = gpualloc_nats_acl::cluster_config(
            &ServerSettings {
                host: "127.0.0.1".into(),
                port: *client,
                store_dir: dir.display().to_string(),
                tls: None,
            },
            &Cluster {
                name: "gpualloc-local".into(),
                server_name: name.clone(),
                port: *cluster,
                routes: routes.clone(),
            },
            *monitor,
            &users,
        );
        let path = dir.join("nats.conf");
        write_private(&path, conf.as_bytes())?;
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&path)
            .arg("-l")
            .arg(state.join("logs").join(format!("{name}.log")));
        children.push(Guard::spawn(&name, &mut cmd)?);
    }
    for (client, _, _) in &ports {
        procs::wait_port(*client, Duration::from_secs(20), "nats-server")?;
    }
    Ok(ports
        .iter()
        .map(|(c, _, _)| format!("nats://127.0.0.1:{c}"))
        .collect::<Vec<_>>()
        .join(","))
}

fn nats_conf(
    state: &Path,
    port: u16,
    passwords: &std::collections::BTreeMap<&'static str, String>,
) -> String {
    use gpualloc_nats_acl::{Secret, ServerSettings};
    let users = gpualloc_nats_acl::users("gpualloc", "GPUALLOC", |name| {
        Secret::Password(passwords.get(name).cloned().unwrap_or_default())
    });
    gpualloc_nats_acl::server_config(
        &ServerSettings {
            host: "127.0.0.1".into(),
            port,
            store_dir: state.join("nats").display().to_string(),
            tls: None,
        },
        &users,
    )
}

fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::{io::Write, os::unix::fs::OpenOptionsExt};
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(bytes)?;
    Ok(())
}

async fn wait_serving(svc: &Proc) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(90);
    let channel = Channel::from_shared(format!("http://127.0.0.1:{}", svc.port))?.connect_lazy();
    let mut client = HealthClient::new(channel);
    loop {
        let status = client
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await
            .ok()
            .map(|r| r.into_inner().status);
        if status == Some(ServingStatus::Serving as i32) {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "{} is not SERVING after 90s; see .gpualloc/logs/{}.log",
                svc.name,
                svc.name
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// How long the tokens printed in the banner stay valid.
const BANNER_TTL: Duration = Duration::from_secs(12 * 3600);

fn admin<T>(token: &str, message: T) -> anyhow::Result<Request<T>> {
    let mut r = Request::new(message);
    r.metadata_mut().insert(
        "authorization",
        MetadataValue::try_from(format!("Bearer {token}"))?,
    );
    Ok(r)
}

/// Demo pools and a demo tenant, each created only when it does not exist
/// yet: what an operator changed (a pool's size, a quota's threshold) or
/// filled is never reverted on the next start, and no start fails because
/// of it.
async fn seed(pool_url: &str, token: &str) -> anyhow::Result<()> {
    let failover = gpualloc_client::Failover::new(
        gpualloc_client::split_urls(pool_url),
        gpualloc_client::Policy::default(),
        Ok,
    )?;
    let mut pools = ResourcePoolServiceClient::new(failover);
    let pool =
        |id: &str, cpu: i64, mem: i64, storage: i64, gpus: &[(&str, i32)]| rp::PutPoolRequest {
            pool: Some(rp::Pool {
                pool_id: id.into(),
                capacity: Some(rp::Capacity {
                    cpu_millis: cpu,
                    memory_mib: mem,
                    storage_gib: storage,
                    gpus_by_model: gpus.iter().map(|(m, n)| ((*m).to_owned(), *n)).collect(),
                    custom: Default::default(),
                }),
                ..Default::default()
            }),
            update_mask: None,
        };
    let mut kept = Vec::new();
    for p in [
        pool("gpu-a100", 128_000, 1_048_576, 50_000, &[("A100", 8)]),
        pool("gpu-h100", 96_000, 786_432, 20_000, &[("H100", 4)]),
        pool("cpu-only", 256_000, 1_048_576, 100_000, &[]),
    ] {
        let id = p
            .pool
            .as_ref()
            .map(|p| p.pool_id.clone())
            .unwrap_or_default();
        let existing = pools
            .get_pool(admin(
                token,
                rp::GetPoolRequest {
                    pool_id: id.clone(),
                },
            )?)
            .await;
        match existing {
            Ok(_) => kept.push(format!("pool {id}")),
            Err(e) if e.code() == tonic::Code::NotFound => {
                pools
                    .put_pool(admin(token, p)?)
                    .await
                    .with_context(|| format!("seeding pool {id}"))?;
            }
            Err(e) => return Err(anyhow::anyhow!("reading pool {id}: {}", e.message())),
        }
    }
    let existing = pools
        .get_tenant_quota(admin(
            token,
            rp::GetTenantQuotaRequest {
                tenant: "demo".into(),
            },
        )?)
        .await;
    match existing {
        Ok(_) => kept.push("the demo quota".into()),
        Err(e) if e.code() == tonic::Code::NotFound => {
            let quota = rp::SetTenantQuotaRequest {
                tenant: "demo".into(),
                limits: Some(rp::Resources {
                    cpu_millis: 64_000,
                    memory_mib: 262_144,
                    gpus: 8,
                    storage_gib: 10_000,
                    ..Default::default()
                }),
                approval_above: Some(rp::Resources {
                    gpus: 4,
                    ..Default::default()
                }),
                max_hold: None,
                update_mask: None,
            };
            pools
                .set_tenant_quota(admin(token, quota)?)
                .await
                .context("seeding the demo quota")?;
        }
        Err(e) => return Err(anyhow::anyhow!("reading the demo quota: {}", e.message())),
    }
    if !kept.is_empty() {
        eprintln!(
            "xtask: kept as they are (seeding only creates what is missing): {}",
            kept.join(", ")
        );
    }
    Ok(())
}

fn print_banner(
    state: &Path,
    nats_url: &str,
    plan: &[Proc],
    children: &[Guard],
    tenant_token: &str,
    admin_token: &str,
) {
    let pids: Vec<String> = children
        .iter()
        .map(|c| format!("{} {}", c.name, c.pid()))
        .collect();
    let tenant = r#"-H "authorization: Bearer $TOKEN""#;
    let admin = r#"-H "authorization: Bearer $ADMIN""#;
    let state_arg = if state == crate::root().join(".gpualloc") {
        String::new()
    } else {
        format!(" --state-dir {}", state.display())
    };
    println!(
        r#"
gpualloc is up.
  allocation     {allocation}
  resource-pool  {pool}
  viewer         {viewer}
  metrics        http://127.0.0.1:9091/metrics (allocation), :9092 (resource-pool), :9093 (viewer){metrics_more}
  NATS           {nats_url}{clients}
  state          {state}
  processes      {pids}
Stop one with `kill $(cat {state}/pids/<service>.pid)` and start it again with
`sh {state}/run-<service>.sh &` (this command still stops it on Ctrl-C).
Demo: pools gpu-a100 (8x A100), gpu-h100 (4x H100), cpu-only; tenant "demo"
(8 GPUs, 64 cores; more than 4 GPUs needs an administrator's approval).

Every call needs a bearer token (health and reflection excepted). These are
signed by the development key in {state}/auth/ and valid for 12 hours;
`cargo xtask token --tenant demo{state_arg}` and `cargo xtask token --admin{state_arg}` print fresh ones:

  export TOKEN={tenant_token}
  export ADMIN={admin_token}

Try (grpcurl, or `npx @bufbuild/buf curl --protocol grpc --http2-prior-knowledge`):

  grpcurl -plaintext 127.0.0.1:50051 list

  grpcurl -plaintext {tenant} -d '{{"tenant":"demo","resources":{{"gpus":2,"gpu_model":"A100","cpu_millis":8000,"memory_mib":65536}}}}' \
    127.0.0.1:50052 gpualloc.resourcepool.v1.ResourcePoolService/CheckQuota

  grpcurl -plaintext {tenant} -d '{{"tenant":"demo","request_id":"demo-1","resources":{{"gpus":2,"gpu_model":"A100","cpu_millis":8000,"memory_mib":65536}},"lease":"3600s"}}' \
    127.0.0.1:50051 gpualloc.allocation.v1.AllocationService/CreateAllocation

  grpcurl -plaintext {tenant} -d '{{"allocation_id":"<id from above>"}}' \
    127.0.0.1:50051 gpualloc.allocation.v1.AllocationService/GetAllocation

  grpcurl -plaintext {tenant} -d '{{"allocation_id":"<id from above>"}}' \
    127.0.0.1:50053 gpualloc.viewer.v1.ViewerService/GetAllocationView

  grpcurl -plaintext {tenant} -d '{{"tenant":"demo"}}' \
    127.0.0.1:50053 gpualloc.viewer.v1.ViewerService/ListAllocationViews

  grpcurl -plaintext {admin} -d '{{}}' 127.0.0.1:50052 gpualloc.resourcepool.v1.ResourcePoolService/ListPools

NATS refuses anonymous clients; each service has its own user (passwords in
{state}/nats/, the operator's too: `nats --user operator --password "$(cat {state}/nats/operator.password)" stream info GPUALLOC`).
Logs: {state}/logs/. Ctrl-C stops everything; state survives for the next `cargo xtask up`.
"#,
        state = state.display(),
        pids = pids.join(", "),
        allocation = addrs(plan, 1),
        pool = addrs(plan, 0),
        viewer = addrs(plan, 2),
        metrics_more = if plan.iter().any(|p| p.replica > 0) {
            "; replica r at port + 10·r"
        } else {
            ""
        },
        clients = if plan.iter().any(|p| p.replica > 0) {
            format!(
                "\n  CLI            gpualloc --allocation-addr {} --resource-pool-addr {} --viewer-addr {} …\n                 (calls rotate over the replicas and fail over; see docs/operations.md)",
                addrs(plan, 1),
                addrs(plan, 0),
                addrs(plan, 2)
            )
        } else {
            String::new()
        },
    );
}

/// Waits for Ctrl-C or SIGTERM; reports services that exit meanwhile (the
/// others keep running: that is the point).
async fn supervise(children: &mut [Guard]) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let mut reported = vec![false; children.len()];
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return,
            _ = async {
                match term.as_mut() {
                    Some(t) => { t.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        for (i, child) in children.iter_mut().enumerate() {
            if !reported[i]
                && let Ok(Some(status)) = child.child.try_wait()
            {
                eprintln!(
                    "xtask: {} exited ({status}); the others keep running",
                    child.name
                );
                reported[i] = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use gpualloc_e2e::{Backend, Mesh, admin, fixtures::*};

    use super::*;

    #[test]
    fn replicas_get_ports_ten_apart_and_need_postgres() {
        let err = plan(2, None).unwrap_err().to_string();
        assert!(err.contains("--database postgres://"), "{err}");
        assert!(plan(0, None).is_err());
        let p = plan(3, Some("postgres://x")).unwrap();
        assert_eq!(p.len(), 9);
        assert_eq!(
            addrs(&p, 1),
            "127.0.0.1:50051,127.0.0.1:50061,127.0.0.1:50071"
        );
        assert_eq!(
            addrs(&p, 0),
            "127.0.0.1:50052,127.0.0.1:50062,127.0.0.1:50072"
        );
        let names: Vec<&str> = p
            .iter()
            .filter(|p| p.svc == 2)
            .map(|p| p.name.as_str())
            .collect();
        assert_eq!(names, ["viewer", "viewer-1", "viewer-2"]);
        assert_eq!(
            p.iter()
                .filter(|p| p.svc == 2)
                .map(|p| p.metrics_port)
                .max(),
            Some(9113)
        );
        // One replica: exactly what it always was.
        let one = plan(1, None).unwrap();
        assert_eq!(
            one.iter()
                .map(|p| (p.name.as_str(), p.port))
                .collect::<Vec<_>>(),
            [
                ("resource-pool", 50052),
                ("allocation", 50051),
                ("viewer", 50053)
            ]
        );
    }

    /// A start never undoes an operator, and never fails because of what an
    /// operator did: the demo objects are created once, then left alone.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn seeding_creates_what_is_missing_and_leaves_the_rest_alone() {
        let mesh = Mesh::start(Backend::Sqlite).await;
        let url = mesh.pool.url();
        let token = gpualloc_testkit::auth::admin_token();
        seed(&url, &token).await.unwrap();
        let pool = get_pool(&mesh, "gpu-h100").await;
        assert_eq!(pool.capacity.unwrap().gpus_by_model["H100"], 4);

        // An administrator grows the pool, fills it, and changes the demo
        // quota's approval threshold.
        put_pool(&mesh, "gpu-h100", gpu_capacity(&[("H100", 16)])).await;
        let mut quota = mesh
            .pools()
            .get_tenant_quota(admin(rp::GetTenantQuotaRequest {
                tenant: "demo".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        quota.approval_above = Some(rp::Resources {
            gpus: 12,
            ..Default::default()
        });
        mesh.pools()
            .set_tenant_quota(admin(rp::SetTenantQuotaRequest {
                tenant: "demo".into(),
                approval_above: quota.approval_above.clone(),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec!["approval_above".into()],
                }),
                ..Default::default()
            }))
            .await
            .unwrap();
        set_quota(&mesh, "big", gpus(16, "")).await;
        let a = create(&mesh, "big", gpus(10, "H100")).await;
        wait_state(
            &mesh,
            "big",
            &a.allocation_id,
            gpualloc_proto::allocation::v1::State::Allocated,
        )
        .await;

        // The next start: nothing reverted, nothing refused.
        seed(&url, &token).await.unwrap();
        let pool = get_pool(&mesh, "gpu-h100").await;
        assert_eq!(pool.capacity.unwrap().gpus_by_model["H100"], 16);
        let quota = mesh
            .pools()
            .get_tenant_quota(admin(rp::GetTenantQuotaRequest {
                tenant: "demo".into(),
            }))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(quota.approval_above.unwrap().gpus, 12);
    }
}
