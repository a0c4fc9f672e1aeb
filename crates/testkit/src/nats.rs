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

fn nats_binary() -> String {
    for candidate in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if std::path::Path::new(candidate).exists() {
            return candidate.into();
        }
    }
    "nats-server".into()
}

/// A throwaway `nats-server` with JetStream, on a fixed port and store
/// folder so that it can be killed and restarted with its data.
pub struct NatsServer {
    pub port: u16,
    store: tempfile::TempDir,
    child: Option<Child>,
}

impl NatsServer {
    pub fn start() -> NatsServer {
        Self::start_on(free_port())
    }

    /// Starts on a chosen port (a test may point a service at it before).
    pub fn start_on(port: u16) -> NatsServer {
        let mut s = NatsServer {
            port,
            store: tempfile::tempdir().unwrap(),
            child: None,
        };
        s.spawn();
        s
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
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
        // A watchdog shell kills the server when the test process is gone,
        // even after a panic or SIGKILL, so no server outlives its tests.
        let script = format!(
            "{bin} -a 127.0.0.1 -p {port} -js -sd {dir} >/dev/null 2>&1 & n=$!; echo $n > {dir}/nats.pid; \
             trap 'kill $n 2>/dev/null; exit 0' TERM INT; \
             while kill -0 {parent} 2>/dev/null && kill -0 $n 2>/dev/null; do sleep 0.5; done; \
             kill $n 2>/dev/null; wait $n",
            bin = nats_binary(),
            port = self.port,
            dir = self.store.path().display(),
            parent = std::process::id(),
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdin(Stdio::null())
            .spawn()
            .expect("cannot start nats-server (is it installed? `cargo xtask test` installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "nats-server did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (SIGTERM to the watchdog, which stops the server and
    /// waits for it).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server with SIGKILL (no flush, no goodbye to clients), as a
    /// crash would; `restart` or `start_again` brings it back with its data.
    pub fn kill(&mut self) {
        let pid = std::fs::read_to_string(self.store.path().join("nats.pid")).unwrap_or_default();
        let _ = Command::new("kill").args(["-9", pid.trim()]).status();
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(15);
        while TcpStream::connect(("127.0.0.1", self.port)).is_ok() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
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

/// The NATS server shared by this test process.
pub fn nats_url() -> String {
    static SHARED: OnceLock<String> = OnceLock::new();
    static SERVER: OnceLock<std::sync::Mutex<Option<NatsServer>>> = OnceLock::new();
    SHARED
        .get_or_init(|| {
            if let Ok(url) = std::env::var("GPUALLOC_TEST_NATS_URL") {
                return url;
            }
            let server = NatsServer::start();
            let url = server.url();
            // Kept for the life of the process; the watchdog cleans up.
            let _ = SERVER.set(std::sync::Mutex::new(Some(server)));
            url
        })
        .clone()
}
