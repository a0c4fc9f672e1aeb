//! A three-node NATS JetStream cluster for fault tests, each node a real
//! `nats-server` in a network namespace of its own, joined to the test's
//! host by a veth pair on a bridge. Taking a node's link down isolates it
//! from the other nodes and from every client at once — a real partition,
//! with connections that go silent instead of being reset — and bringing
//! it up heals it. Needs root (or CAP_NET_ADMIN) and iproute2's `ip`.
//!
//! Names carry the test process's id; namespaces and bridges left behind
//! by a process that died are removed when the next cluster starts.

use std::{
    net::{SocketAddr, TcpStream},
    path::PathBuf,
    process::{Child, Command},
    time::{Duration, Instant},
};

use crate::nats::{nats_password, spawn_watched};

/// One member.
pub struct ClusterNode {
    /// The server name (`n1`, `n2`, `n3`): the stream's leader is named so.
    pub name: String,
    pub ip: String,
    netns: String,
    /// The host's end of the node's link: down is a partition.
    link: String,
    store: tempfile::TempDir,
    child: Option<Child>,
}

impl ClusterNode {
    /// This node's client URL, without credentials.
    pub fn url(&self) -> String {
        format!("nats://{}:4222", self.ip)
    }

    fn pid(&self) -> Option<String> {
        std::fs::read_to_string(self.store.path().join("nats.pid"))
            .ok()
            .map(|p| p.trim().to_owned())
    }

    fn spawn(&mut self) {
        let conf = self.store.path().join("nats.conf");
        self.child = Some(spawn_watched(
            &format!("ip netns exec {}", self.netns),
            &conf,
            self.store.path(),
        ));
        wait_port(&self.ip, true);
    }

    /// SIGKILL: no flush, no goodbye to clients or peers.
    pub fn kill(&mut self) {
        if let Some(pid) = self.pid() {
            let _ = Command::new("kill").args(["-9", &pid]).status();
        }
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
    }

    /// Starts a killed node again on its data.
    pub fn start_again(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    /// Cuts the node off from its peers and every client.
    pub fn isolate(&self) {
        ip(&["link", "set", &self.link, "down"]);
    }

    pub fn heal(&self) {
        ip(&["link", "set", &self.link, "up"]);
    }

    /// The node's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.store.path().join("nats.log")).unwrap_or_default()
    }
}

pub struct NatsCluster {
    pub nodes: Vec<ClusterNode>,
    bridge: String,
}

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("running `ip` (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {} (a NATS cluster test needs root and iproute2)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

fn ip_quiet(args: &[&str]) {
    let _ = Command::new("ip").args(args).output();
}

fn wait_port(ip: &str, up: bool) {
    let addr: SocketAddr = format!("{ip}:4222").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() != up {
        assert!(
            Instant::now() < deadline,
            "nats-server at {addr} did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes namespaces and bridges of test processes that are gone.
fn sweep_stale() {
    let alive = |pid: &str| PathBuf::from(format!("/proc/{pid}")).exists();
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if let Some(rest) = name.strip_prefix("gpan") {
                let pid = &rest[..rest.len().saturating_sub(1)];
                if !alive(pid) {
                    ip_quiet(&["netns", "del", name]);
                }
            }
        }
    }
    if let Ok(out) = Command::new("ip")
        .args(["-o", "link", "show", "type", "bridge"])
        .output()
    {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split(':').nth(1).unwrap_or_default().trim();
            if let Some(pid) = name.strip_prefix("gpab")
                && !alive(pid)
            {
                ip_quiet(&["link", "del", name]);
            }
        }
    }
}

impl NatsCluster {
    /// Starts three members with the services' users (as
    /// [`crate::NatsServer`]) and waits until each takes connections.
    pub fn start() -> NatsCluster {
        sweep_stale();
        let pid = std::process::id();
        // A /24 of 10.213.0.0/16 per test process.
        let net = format!("10.213.{}", pid % 250 + 1);
        let bridge = format!("gpab{pid}");
        ip(&["link", "add", &bridge, "type", "bridge"]);
        let cluster = NatsCluster {
            nodes: Vec::new(),
            bridge,
        };
        ip(&[
            "addr",
            "add",
            &format!("{net}.1/24"),
            "dev",
            &cluster.bridge,
        ]);
        ip(&["link", "set", &cluster.bridge, "up"]);
        let mut cluster = cluster;
        let ips: Vec<String> = (1..=3).map(|k| format!("{net}.{}", 10 + k)).collect();
        for k in 1..=3 {
            let netns = format!("gpan{pid}{k}");
            let link = format!("gpah{pid}{k}");
            let inner = format!("gpai{pid}{k}");
            let node_ip = ips[k - 1].clone();
            ip(&["netns", "add", &netns]);
            ip(&["link", "add", &link, "type", "veth", "peer", "name", &inner]);
            ip(&["link", "set", &inner, "netns", &netns]);
            ip(&["link", "set", &link, "master", &cluster.bridge]);
            ip(&["link", "set", &link, "up"]);
            let in_ns = |args: &[&str]| {
                let mut all = vec!["netns", "exec", &netns, "ip"];
                all.extend_from_slice(args);
                ip(&all);
            };
            in_ns(&["addr", "add", &format!("{node_ip}/24"), "dev", &inner]);
            in_ns(&["link", "set", &inner, "up"]);
            in_ns(&["link", "set", "lo", "up"]);
            let store = tempfile::tempdir().unwrap();
            let users = gpualloc_nats_acl::users("*", "*", |name| {
                gpualloc_nats_acl::Secret::Password(nats_password(name))
            });
            let config = gpualloc_nats_acl::cluster_config(
                &gpualloc_nats_acl::ServerSettings {
                    host: "0.0.0.0".into(),
                    port: 4222,
                    store_dir: store.path().join("js").display().to_string(),
                    tls: None,
                },
                &gpualloc_nats_acl::Cluster {
                    name: "gpualloc-test".into(),
                    server_name: format!("n{k}"),
                    port: 6222,
                    routes: ips.iter().map(|i| format!("nats://{i}:6222")).collect(),
                },
                8222,
                &users,
            );
            std::fs::write(store.path().join("nats.conf"), config).unwrap();
            cluster.nodes.push(ClusterNode {
                name: format!("n{k}"),
                ip: node_ip,
                netns,
                link,
                store,
                child: None,
            });
        }
        for node in &mut cluster.nodes {
            node.spawn();
        }
        cluster
    }

    /// Every member's URL, comma-separated (what the services are given).
    pub fn urls(&self) -> String {
        let urls: Vec<String> = self.nodes.iter().map(ClusterNode::url).collect();
        urls.join(",")
    }

    pub fn node(&mut self, name: &str) -> &mut ClusterNode {
        self.nodes
            .iter_mut()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    /// Every node's log, for a failing test.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| {
                let log = n.log();
                let tail: Vec<&str> = log.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {} ---\n{}\n", n.name, tail.join("\n"))
            })
            .collect()
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                let _ = Command::new("kill").arg(child.id().to_string()).status();
                let _ = child.wait();
            }
            ip_quiet(&["netns", "del", &node.netns]);
            ip_quiet(&["link", "del", &node.link]);
        }
        ip_quiet(&["link", "del", &self.bridge]);
    }
}
