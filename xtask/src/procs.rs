//! Child processes that must not outlive xtask.

use std::{
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Child, Command},
    time::{Duration, Instant},
};

/// A child stopped (SIGTERM, then SIGKILL after a grace period) on drop.
pub struct Guard {
    pub name: String,
    pub child: Child,
}

impl Guard {
    pub fn spawn(name: &str, cmd: &mut Command) -> anyhow::Result<Guard> {
        use std::os::unix::process::CommandExt as _;
        // A process group of its own: a terminal's Ctrl-C reaches xtask
        // only, which stops the services first (they flush their outboxes
        // to NATS) and NATS last, instead of everything at once.
        let child = cmd
            .process_group(0)
            .spawn()
            .map_err(|e| anyhow::anyhow!("starting {name}: {e}"))?;
        Ok(Guard {
            name: name.to_owned(),
            child,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM and wait up to `grace`, then SIGKILL.
    pub fn stop(&mut self, grace: Duration) {
        if let Ok(Some(_)) = self.child.try_wait() {
            return;
        }
        let _ = Command::new("kill")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!("xtask: {} did not stop in {grace:?}; killing it", self.name);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(20));
    }
}

pub fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

pub fn port_free(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

/// The process listening on TCP `port`, as "PID 1234 (gpualloc-resource-pool)",
/// from /proc (Linux): the socket's inode in /proc/net/tcp{,6}, then the
/// process holding a descriptor to it. `None` when it cannot be told (not
/// Linux, or another user's process).
pub fn holder_of(port: u16) -> Option<String> {
    let mut inodes = Vec::new();
    for table in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(table) else {
            continue;
        };
        inodes.extend(listening_inodes(&text, port));
    }
    if inodes.is_empty() {
        return None;
    }
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(fds) = std::fs::read_dir(entry.path().join("fd")) else {
            continue;
        };
        for fd in fds.flatten() {
            let Ok(target) = std::fs::read_link(fd.path()) else {
                continue;
            };
            let target = target.to_string_lossy();
            if inodes.iter().any(|i| target == format!("socket:[{i}]")) {
                let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
                return Some(format!("PID {pid} ({})", name.trim()));
            }
        }
    }
    None
}

/// Inodes of the sockets listening on `port` in a /proc/net/tcp table
/// (state 0A is LISTEN; the local address is HEX_IP:HEX_PORT).
fn listening_inodes(table: &str, port: u16) -> Vec<String> {
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            let local_port = cols.get(1)?.rsplit(':').next()?;
            (u16::from_str_radix(local_port, 16).ok()? == port && cols.get(3)? == &"0A")
                .then(|| cols.get(9).map(|s| (*s).to_owned()))?
        })
        .collect()
}

/// Stops the process whose PID `pid_file` holds, if it still runs and is
/// `comm` (the kernel's short name, at most 15 characters): a service
/// started by hand with a run script registers itself this way, so that
/// the `cargo xtask up` it belongs to stops it too. Returns its PID.
pub fn stop_registered(pid_file: &Path, comm: &str, grace: Duration) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let _ = std::fs::remove_file(pid_file);
    let running = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
    let short: String = comm.chars().take(15).collect();
    if running.trim() != short {
        return None;
    }
    let _ = Command::new("kill").arg(pid.to_string()).status();
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline && Path::new(&format!("/proc/{pid}")).exists() {
        std::thread::sleep(Duration::from_millis(50));
    }
    if Path::new(&format!("/proc/{pid}")).exists() {
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    }
    Some(pid)
}

/// Waits until something accepts connections on `port`.
pub fn wait_port(port: u16, timeout: Duration, what: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            anyhow::bail!("{what} did not start listening on port {port} within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Runs a command to completion, failing on a non-zero exit.
pub fn run(what: &str, cmd: &mut Command) -> anyhow::Result<()> {
    eprintln!("xtask: {what}");
    let status = cmd.status().map_err(|e| anyhow::anyhow!("{what}: {e}"))?;
    if !status.success() {
        anyhow::bail!("{what} failed ({status})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_registered_process_is_stopped_and_a_stranger_is_not() {
        let dir = tempdir();
        let file = dir.join("svc.pid");
        let mut child = Command::new("sleep").arg("60").spawn().unwrap();
        // Until it has exec'd, the child still has the test's name.
        let comm = format!("/proc/{}/comm", child.id());
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::fs::read_to_string(&comm).unwrap_or_default().trim() != "sleep" {
            assert!(Instant::now() < deadline, "sleep did not start");
            std::thread::sleep(Duration::from_millis(10));
        }
        std::fs::write(&file, child.id().to_string()).unwrap();
        // A PID file pointing at another program (a reused PID) is ignored.
        assert_eq!(
            stop_registered(&file, "gpualloc-viewer", Duration::from_secs(5)),
            None
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "a stranger was stopped"
        );
        std::fs::write(&file, child.id().to_string()).unwrap();
        assert_eq!(
            stop_registered(&file, "sleep", Duration::from_secs(1)),
            Some(child.id())
        );
        assert!(child.wait().unwrap().code().is_none(), "killed by a signal");
        assert!(!file.exists());
        let _ = std::fs::remove_dir_all(dir);
    }

    fn tempdir() -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("xtask-procs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_busy_port_names_the_process_holding_it() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let holder = holder_of(port).unwrap();
        assert!(
            holder.starts_with(&format!("PID {} (", std::process::id())),
            "{holder}"
        );
        drop(listener);
        assert_eq!(holder_of(port), None);
    }

    #[test]
    fn only_listening_sockets_of_the_port_count() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:C352 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 111 1 0
   1: 0100007F:C352 0100007F:D000 01 00000000:00000000 00:00000000 00000000     0        0 222 1 0
   2: 0100007F:C353 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 333 1 0";
        assert_eq!(listening_inodes(table, 0xC352), ["111"]);
    }
}
