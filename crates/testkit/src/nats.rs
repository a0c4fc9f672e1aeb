//! Throwaway `nats-server`s for tests: each test process's users and
//! passwords, a server per process (or on a chosen port, with TLS, or with
//! other users), killed with the process even after a panic.

use std::{
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A free port below the kernel's ephemeral range, for a server a test
/// stops and starts again on the same port: while it is down, no
/// [`free_port`] (nor any outgoing connection) can be handed its port.
pub fn free_port_for_restarts() -> u16 {
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let floor = 10_000u16.min(low.saturating_sub(1000));
    for _ in 0..1000 {
        let port = rand::random_range(floor..low);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    free_port()
}

pub(crate) fn nats_binary() -> String {
    if let Ok(bin) = std::env::var("GPUALLOC_NATS_SERVER") {
        return bin;
    }
    for candidate in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    "nats-server".into()
}

/// Starts `nats-server -c conf` (after `launcher`, e.g. `ip netns exec
/// NS`) under a watchdog shell that kills the server when the test process
/// is gone, even after a panic or SIGKILL, so no server outlives its tests.
/// The server's pid goes to `dir/nats.pid`, its log to `dir/nats.log`.
pub(crate) fn spawn_watched(
    launcher: &str,
    conf: &std::path::Path,
    dir: &std::path::Path,
) -> Child {
    let script = format!(
        "{launcher} {bin} -c {conf} >>{dir}/nats.log 2>&1 & n=$!; echo $n > {dir}/nats.pid; \
         trap 'kill $n 2>/dev/null; exit 0' TERM INT; \
         while kill -0 {parent} 2>/dev/null && kill -0 $n 2>/dev/null; do sleep 0.5; done; \
         kill $n 2>/dev/null; wait $n",
        bin = nats_binary(),
        conf = conf.display(),
        dir = dir.display(),
        parent = std::process::id(),
    );
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .stdin(Stdio::null())
        .spawn()
        .expect("cannot start nats-server (is it installed? `cargo xtask test` installs it)")
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the command name in parentheses.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Waits until process `pid` is gone; false when it is still there after
/// `within`.
fn wait_gone(pid: u32, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while alive(pid) {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// The passwords of this test process's NATS users (one set for every
/// server it starts), by user name.
fn passwords() -> &'static std::collections::BTreeMap<&'static str, String> {
    static P: OnceLock<std::collections::BTreeMap<&'static str, String>> = OnceLock::new();
    P.get_or_init(|| {
        [
            gpualloc_nats_acl::ALLOCATION,
            gpualloc_nats_acl::RESOURCE_POOL,
            gpualloc_nats_acl::VIEWER,
            gpualloc_nats_acl::OPERATOR,
        ]
        .into_iter()
        .map(|u| (u, uuid::Uuid::new_v4().simple().to_string()))
        .collect()
    })
}

/// The password of `user` on the servers this process starts.
pub fn nats_password(user: &str) -> String {
    passwords().get(user).cloned().unwrap_or_default()
}

/// A client of `url` logged in as `user` (of this process's servers).
pub async fn nats_connect_as(
    url: &str,
    user: &str,
) -> Result<async_nats::Client, async_nats::ConnectError> {
    async_nats::ConnectOptions::with_user_and_password(user.to_owned(), nats_password(user))
        .custom_inbox_prefix(gpualloc_nats_acl::inbox_prefix(user))
        // A member cut off by a partition test goes silent: notice within
        // seconds and move to another.
        .ping_interval(Duration::from_secs(1))
        .connect(url.split(',').collect::<Vec<&str>>())
        .await
}

/// `url` (`nats://host:port`) with `user`'s credentials in it (the
/// services read them from there; the client library does not).
pub fn nats_url_as(url: &str, user: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) if !rest.contains('@') => {
            format!("{scheme}://{user}:{}@{rest}", nats_password(user))
        }
        _ => url.to_owned(),
    }
}

/// The accounts configuration of a test server: each service's user with
/// its permissions (any stream and prefix: every test has its own), the
/// operator with every right, and no anonymous access.
pub fn nats_config(
    port: u16,
    store: &std::path::Path,
    tls: Option<gpualloc_nats_acl::ServerTls>,
) -> String {
    use gpualloc_nats_acl::{Secret, ServerSettings};
    let users = gpualloc_nats_acl::users("*", "*", |name| Secret::Password(nats_password(name)));
    gpualloc_nats_acl::server_config(
        &ServerSettings {
            host: "127.0.0.1".into(),
            port,
            store_dir: store.join("js").display().to_string(),
            tls,
        },
        &users,
    )
}

/// A throwaway `nats-server` with JetStream and the services' users (see
/// [`nats_config`]), on a fixed port and store folder so that it can be
/// killed and restarted with its data.
pub struct NatsServer {
    pub port: u16,
    store: tempfile::TempDir,
    tls: Option<gpualloc_nats_acl::ServerTls>,
    /// Users of the server's configuration; `None`: [`nats_config`]'s.
    users: Option<Vec<gpualloc_nats_acl::User>>,
    child: Option<Child>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        Self::start_on(free_port_for_restarts())
    }

    /// Starts on a chosen port (a test may point a service at it before).
    pub fn start_on(port: u16) -> NatsServer {
        Self::launch(port, None, None)
    }

    /// A server with these users (nkeys, other permissions) instead of
    /// the services' password users.
    pub fn start_with_users(users: Vec<gpualloc_nats_acl::User>) -> NatsServer {
        Self::launch(free_port(), None, Some(users))
    }

    /// A server that speaks only TLS (and, with a client CA, takes only
    /// clients with a certificate it signed).
    pub fn start_with_tls(tls: gpualloc_nats_acl::ServerTls) -> NatsServer {
        Self::launch(free_port(), Some(tls), None)
    }

    fn launch(
        port: u16,
        tls: Option<gpualloc_nats_acl::ServerTls>,
        users: Option<Vec<gpualloc_nats_acl::User>>,
    ) -> NatsServer {
        let mut s = NatsServer {
            port,
            store: tempfile::tempdir().unwrap(),
            tls,
            users,
            child: None,
        };
        s.spawn();
        s
    }

    /// The server's URL, without credentials (anonymous clients are
    /// refused: see [`nats_url_as`]).
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The URL with `user`'s credentials.
    pub fn url_as(&self, user: &str) -> String {
        nats_url_as(&self.url(), user)
    }

    /// The server's process id (the watchdog writes it at start).
    pub fn pid(&self) -> Option<u32> {
        std::fs::read_to_string(self.store.path().join("nats.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    pub fn store_dir(&self) -> PathBuf {
        self.store.path().to_owned()
    }

    fn spawn(&mut self) {
        let conf = self.store.path().join("nats.conf");
        let config = match &self.users {
            None => nats_config(self.port, self.store.path(), self.tls.clone()),
            Some(users) => gpualloc_nats_acl::server_config(
                &gpualloc_nats_acl::ServerSettings {
                    host: "127.0.0.1".into(),
                    port: self.port,
                    store_dir: self.store.path().join("js").display().to_string(),
                    tls: self.tls.clone(),
                },
                users,
            ),
        };
        std::fs::write(&conf, config).unwrap();
        let _ = std::fs::remove_file(self.store.path().join("nats.pid"));
        let child = spawn_watched("", &conf, self.store.path());
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        // Up once this start's server (not a previous one) takes connections.
        while self.pid().is_none_or(|pid| !alive(pid))
            || TcpStream::connect(("127.0.0.1", self.port)).is_err()
        {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start on port {}:\n{}",
                self.port,
                self.log_tail(20)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (SIGTERM to the watchdog, which stops the server)
    /// and returns once its process is gone, so that a start on the same
    /// port and data cannot race a server still shutting down.
    pub fn stop(&mut self) {
        let pid = self.pid();
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
        if let Some(pid) = pid
            && !wait_gone(pid, Duration::from_secs(30))
        {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            wait_gone(pid, Duration::from_secs(5));
        }
    }

    /// Kills the server with SIGKILL (no flush, no goodbye to clients), as a
    /// crash would; `restart` or `start_again` brings it back with its data.
    pub fn kill(&mut self) {
        let pid = self.pid();
        if let Some(pid) = pid {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        if let Some(pid) = pid {
            wait_gone(pid, Duration::from_secs(15));
        }
    }

    /// The end of the server's log, for a failing test.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.store.path().join("nats.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// Starts a stopped or killed server again on the same port and data.
    pub fn start_again(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    /// Starts the server again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The NATS server shared by this test process (without credentials: see
/// [`nats_url_as`]). Each test process starts its own, with this
/// process's passwords.
pub fn nats_url() -> String {
    static SHARED: OnceLock<String> = OnceLock::new();
    static SERVER: OnceLock<std::sync::Mutex<Option<NatsServer>>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            let server = NatsServer::start();
            let url = server.url();
            // Kept for the life of the process; the watchdog cleans up.
            let _ = SERVER.set(std::sync::Mutex::new(Some(server)));
            url
        })
        .clone()
}
