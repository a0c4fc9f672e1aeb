//! `cargo xtask test`: what CI runs. Installs what is missing, runs the
//! linters, starts a throwaway PostgreSQL if none answers, runs every test
//! (each test process starts its own NATS JetStream servers), and stops
//! what it started.

use std::{
    net::TcpStream,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::Context;

use crate::{install, procs};

#[derive(clap::Args)]
pub struct Args {
    /// Skip fmt, clippy and buf lint.
    #[arg(long)]
    no_lint: bool,
    /// Start a throwaway PostgreSQL even if one answers on 5432.
    #[arg(long)]
    own_postgres: bool,
    /// Arguments passed on to `cargo test` (after `--`), e.g. a test filter.
    #[arg(last = true)]
    cargo_test_args: Vec<String>,
}

/// The commit whose public API (`proto/` but the events) clients were
/// given last: `buf breaking` refuses any change that would break them (a
/// renumbered or removed field, a changed type). Move it forward when a
/// release is cut.
const CONTRACT_BASELINE: &str = "cc49d24ba5d33111455d91ae8310d118653c2b3c";

/// The same for the saga's events (`gpualloc.events.v1`), checked on their
/// own: they are on the stream and in the viewer's database, so they move
/// with the services, not with the API. This is the commit that gave them
/// a contract of their own.
const EVENTS_BASELINE: &str = "a4012c1150635fa88f634a5cc690d77e6f4d1c14";

const EVENTS_PROTO: &str = "proto/gpualloc/events";

pub fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let root = crate::root();
    install::libpq()?;
    let nats_bin = install::nats_server()?;
    let buf = install::buf(&root.join("target/tools"))?;
    let grpcurl = install::grpcurl(&root.join("target/tools"))?;
    install::tmux()?;
    // Tests that stop and start a database start PostgreSQL servers of
    // their own from these binaries.
    let pg_bin = install::postgres_bin()?;

    if !args.no_lint {
        procs::run(
            "cargo fmt --check",
            crate::cargo()
                .current_dir(&root)
                .args(["fmt", "--all", "--check"]),
        )?;
        procs::run(
            "cargo clippy -D warnings",
            crate::cargo().current_dir(&root).args([
                "clippy",
                "--workspace",
                "--all-targets",
                "--",
                "-D",
                "warnings",
            ]),
        )?;
        procs::run(
            "buf lint",
            Command::new(&buf).current_dir(&root).arg("lint"),
        )?;
        procs::run(
            &format!("buf breaking (API) against {CONTRACT_BASELINE}"),
            Command::new(&buf)
                .current_dir(&root)
                .args(["breaking", "--exclude-path", EVENTS_PROTO, "--against"])
                .arg(format!(".git#ref={CONTRACT_BASELINE}")),
        )?;
        procs::run(
            &format!("buf breaking (events) against {EVENTS_BASELINE}"),
            Command::new(&buf)
                .current_dir(&root)
                .args(["breaking", "--path", EVENTS_PROTO, "--against"])
                .arg(format!(".git#ref={EVENTS_BASELINE}")),
        )?;
        crate::deploy_check::run(crate::deploy_check::Args {})?;
    }

    let scratch = std::env::temp_dir().join(format!("gpualloc-xtask-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let result = (|| {
        // Every test process starts nats-servers of its own (with the
        // services' users and passwords it made up), so none is started
        // here; the tests find this binary through GPUALLOC_NATS_SERVER.
        let (pg_url, _pg) = postgres(&scratch, args.own_postgres)?;
        eprintln!(
            "xtask: PostgreSQL {pg_url}, nats-server {}",
            nats_bin.display()
        );

        let mut test = crate::cargo();
        test.current_dir(&root)
            .args(["test", "--workspace"])
            .args(&args.cargo_test_args)
            .env("GPUALLOC_NATS_SERVER", &nats_bin)
            .env("GPUALLOC_GRPCURL", &grpcurl)
            .env("GPUALLOC_PG_BIN", &pg_bin)
            .env("GPUALLOC_TEST_DATABASE_URL", &pg_url);
        procs::run("cargo test --workspace", &mut test)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    result?;
    eprintln!("xtask: all checks passed in {:.0?}", started.elapsed());
    Ok(())
}

/// A PostgreSQL the tests may create databases on: `GPUALLOC_TEST_DATABASE_URL`,
/// else the local server on 5432, else a throwaway cluster started here.
fn postgres(scratch: &Path, own: bool) -> anyhow::Result<(String, Option<Cluster>)> {
    if let (Ok(url), false) = (std::env::var("GPUALLOC_TEST_DATABASE_URL"), own) {
        return Ok((url, None));
    }
    if !own && TcpStream::connect(("127.0.0.1", 5432)).is_ok() {
        return Ok(("postgres://postgres@127.0.0.1:5432/postgres".into(), None));
    }
    let cluster = Cluster::start(scratch, false)?;
    let url = format!("postgres://postgres@127.0.0.1:{}/postgres", cluster.port);
    Ok((url, Some(cluster)))
}

/// A throwaway PostgreSQL cluster. PostgreSQL refuses to run as root, so as
/// root it runs as the `postgres` user.
pub struct Cluster {
    bin: PathBuf,
    data: PathBuf,
    pub port: u16,
    as_postgres: bool,
}

impl Cluster {
    fn command(&self, program: &str) -> Command {
        let exe = self.bin.join(program);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(exe);
            c
        } else {
            Command::new(exe)
        }
    }

    /// Starts a cluster on a free port. `durable: false` turns fsync off
    /// (tests); the benchmark keeps PostgreSQL's durable defaults.
    pub fn start(scratch: &Path, durable: bool) -> anyhow::Result<Cluster> {
        let bin = install::postgres_bin()?;
        let as_postgres = Command::new("id")
            .arg("-u")
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
            .unwrap_or(false);
        // The data folder must belong to the user the server runs as.
        let data = PathBuf::from(format!("/tmp/gpualloc-pg-{}", std::process::id()));
        std::fs::create_dir_all(&data)?;
        if as_postgres {
            procs::run(
                "chown postgres",
                Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&data),
            )?;
        }
        let cluster = Cluster {
            bin,
            data,
            port: procs::free_port()?,
            as_postgres,
        };
        procs::run(
            "initdb (throwaway PostgreSQL)",
            cluster
                .command("initdb")
                .args(["-A", "trust", "-U", "postgres", "-D"])
                .arg(&cluster.data)
                .stdout(std::process::Stdio::null()),
        )?;
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c max_connections=300{}",
            cluster.port,
            cluster.data.display(),
            if durable { "" } else { " -c fsync=off" }
        );
        procs::run(
            "pg_ctl start",
            cluster
                .command("pg_ctl")
                .args(["-w", "-D"])
                .arg(&cluster.data)
                .args(["-o", &options, "-l"])
                .arg(cluster.data.join("server.log"))
                .arg("start"),
        )
        .with_context(|| format!("starting PostgreSQL; log in {}", scratch.display()))?;
        Ok(cluster)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .args(["-D"])
            .arg(&self.data)
            .args(["-m", "fast", "stop"])
            .status();
        let _ = std::fs::remove_dir_all(&self.data);
    }
}
