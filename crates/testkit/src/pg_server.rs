//! A PostgreSQL server of the test's own (initdb on a free port), for
//! tests that stop and start the database under the services. As root it
//! runs as the `postgres` user, since PostgreSQL refuses to run as root.
//! Servers left behind by a test process that died are stopped when the
//! next one starts.

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    sync::atomic::{AtomicUsize, Ordering},
};

use crate::free_port_for_restarts;

pub struct PgServer {
    pub port: u16,
    bin: PathBuf,
    data: PathBuf,
    as_postgres: bool,
    running: bool,
}

fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("GPUALLOC_PG_BIN") {
        return dir.into();
    }
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| {
            d.filter_map(|e| e.ok().map(|e| e.path().join("bin")))
                .filter(|p| p.join("pg_ctl").exists())
                .collect()
        })
        .unwrap_or_default();
    versions.sort();
    versions
        .pop()
        .expect("PostgreSQL's binaries (install the postgresql package; `cargo xtask test` does)")
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

const PREFIX: &str = "gpualloc-pgt-";

impl PgServer {
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

    fn run(&self, what: &str, mut cmd: Command) {
        let out = cmd.stdin(Stdio::null()).output().unwrap();
        assert!(
            out.status.success(),
            "{what}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Stops servers of test processes that are gone, removes their data.
    fn sweep(bin: &std::path::Path, as_postgres: bool) {
        let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
            return;
        };
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(rest) = name.strip_prefix(PREFIX) else {
                continue;
            };
            let pid = rest.split('-').next().unwrap_or_default();
            if PathBuf::from(format!("/proc/{pid}")).exists() {
                continue;
            }
            let stale = PgServer {
                port: 0,
                bin: bin.to_owned(),
                data: e.path(),
                as_postgres,
                running: true,
            };
            drop(stale);
        }
    }

    /// initdb and start; returns once the server takes connections.
    pub fn start() -> PgServer {
        static N: AtomicUsize = AtomicUsize::new(0);
        let bin = bin_dir();
        let as_postgres = is_root();
        Self::sweep(&bin, as_postgres);
        let data = std::env::temp_dir().join(format!(
            "{PREFIX}{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&data).unwrap();
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(&data)
                .status()
                .unwrap();
            assert!(ok.success(), "chown postgres {}", data.display());
        }
        let mut server = PgServer {
            port: free_port_for_restarts(),
            bin,
            data,
            as_postgres,
            running: false,
        };
        let mut initdb = server.command("initdb");
        initdb
            .args(["-A", "trust", "-U", "postgres", "-D"])
            .arg(&server.data);
        server.run("initdb", initdb);
        server.start_again();
        server
    }

    /// Starts the stopped server again on its data and port.
    pub fn start_again(&mut self) {
        if self.running {
            return;
        }
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -k {} -c max_connections=200 -c fsync=off",
            self.port,
            self.data.display()
        );
        let mut start = self.command("pg_ctl");
        start
            .args(["-w", "-D"])
            .arg(&self.data)
            .args(["-o", &options, "-l"])
            .arg(self.data.join("server.log"))
            .arg("start");
        self.run("pg_ctl start", start);
        self.running = true;
    }

    /// Stops the server (fast: open connections are terminated, as in a
    /// failover or a crash of the database host).
    pub fn stop(&mut self) {
        if !self.running {
            return;
        }
        let mut stop = self.command("pg_ctl");
        stop.args(["-w", "-D"])
            .arg(&self.data)
            .args(["-m", "fast", "stop"]);
        self.run("pg_ctl stop", stop);
        self.running = false;
    }

    /// A URL of the server's `postgres` database as the superuser.
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.running {
            let _ = self
                .command("pg_ctl")
                .args(["-D"])
                .arg(&self.data)
                .args(["-m", "immediate", "stop"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.data);
    }
}
