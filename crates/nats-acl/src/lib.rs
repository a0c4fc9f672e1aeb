//! Who may publish and subscribe what on the event bus. The saga's events
//! are commands to the services that consume them — a `ReservationGranted`
//! makes an allocation ALLOCATED — so the bus is authenticated: each
//! service has its own NATS user, may publish only the subjects of the
//! events it owns (allocation: `saga.allocation.*` and
//! `view.allocation.*`; resource-pool: `saga.reservation.*`,
//! `view.quota.*`, `view.pool.*`; the viewer: none), may use only its own
//! durable consumer through the JetStream API, and may subscribe only to
//! its own reply inbox. No service may delete, purge or reconfigure the
//! stream. [`server_config`] renders a nats-server configuration with
//! these users; `cargo xtask up`, the test kit and the Kubernetes
//! manifests all use it, so there is one source of truth.

pub mod subjects;

use std::fmt::Write as _;

/// The NATS users of the services, and the operator's.
pub const ALLOCATION: &str = "allocation";
pub const RESOURCE_POOL: &str = "resource-pool";
pub const VIEWER: &str = "viewer";
/// Full rights: operators (the `nats` CLI, `gpualloc-viewer rebuild`,
/// replays) and tests that forge events. Never given to a service.
pub const OPERATOR: &str = "operator";

/// What one service may do on the bus.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceAcl {
    /// The service's name, NATS user and durable consumer name.
    pub name: &'static str,
    /// Subjects it publishes, relative to the prefix.
    pub publishes: &'static [&'static str],
}

pub const SERVICES: [ServiceAcl; 3] = [
    ServiceAcl {
        name: ALLOCATION,
        publishes: &[
            subjects::ALLOCATION_REQUESTED,
            subjects::ALLOCATION_CANCELLED,
            subjects::ALLOCATION_RENEWAL_REQUESTED,
            subjects::ALLOCATION_CHANGED,
        ],
    },
    ServiceAcl {
        name: RESOURCE_POOL,
        publishes: &[
            subjects::RESERVATION_GRANTED,
            subjects::RESERVATION_HELD,
            subjects::RESERVATION_REJECTED,
            subjects::RESERVATION_RELEASED,
            subjects::RESERVATION_NEEDS_APPROVAL,
            subjects::RESERVATION_RENEWED,
            subjects::QUOTA_CHANGED,
            subjects::POOL_CHANGED,
        ],
    },
    ServiceAcl {
        name: VIEWER,
        publishes: &[],
    },
];

/// The ACL of a service by name.
pub fn service(name: &str) -> Option<&'static ServiceAcl> {
    SERVICES.iter().find(|s| s.name == name)
}

/// The reply inbox of a user: a prefix of its own, so that no other user
/// may subscribe to its replies (the default `_INBOX.>` is shared).
pub fn inbox_prefix(user: &str) -> String {
    format!("_INBOX_{user}")
}

/// Publish and subscribe allow-lists of one user.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

/// What `acl` may do on the stream `stream` with subjects under `prefix`.
/// Either may be `*` where every test has a stream of its own.
pub fn permissions(acl: &ServiceAcl, prefix: &str, stream: &str) -> Permissions {
    let durable = acl.name;
    let api = "$JS.API";
    let mut publish: Vec<String> = acl
        .publishes
        .iter()
        .map(|s| format!("{prefix}.{s}"))
        .collect();
    publish.extend([
        format!("{api}.INFO"),
        // Provisioning: look the stream up, create it when it is missing.
        format!("{api}.STREAM.INFO.{stream}"),
        format!("{api}.STREAM.CREATE.{stream}"),
        // Its own durable consumer and nothing else's.
        format!("{api}.CONSUMER.CREATE.{stream}.{durable}"),
        format!("{api}.CONSUMER.CREATE.{stream}.{durable}.>"),
        format!("{api}.CONSUMER.DURABLE.CREATE.{stream}.{durable}"),
        format!("{api}.CONSUMER.INFO.{stream}.{durable}"),
        format!("{api}.CONSUMER.MSG.NEXT.{stream}.{durable}"),
        format!("$JS.ACK.{stream}.{durable}.>"),
    ]);
    Permissions {
        publish,
        subscribe: vec![format!("{}.>", inbox_prefix(acl.name))],
    }
}

/// How a user proves who it is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Secret {
    Password(String),
    /// A password the server reads from this environment variable when it
    /// loads the configuration (`password: $NAME`), so that the file holds
    /// no secret (Kubernetes: a ConfigMap, and the variable from a Secret).
    PasswordFromEnv(String),
    /// The user's public nkey (`U…`); the seed stays with the service.
    Nkey(String),
}

/// One user of the server.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct User {
    pub name: String,
    pub secret: Secret,
    /// `None`: every right (the operator).
    pub permissions: Option<Permissions>,
}

impl User {
    /// A service's user with its permissions.
    pub fn service(acl: &ServiceAcl, secret: Secret, prefix: &str, stream: &str) -> User {
        User {
            name: acl.name.to_owned(),
            secret,
            permissions: Some(permissions(acl, prefix, stream)),
        }
    }

    pub fn operator(secret: Secret) -> User {
        User {
            name: OPERATOR.to_owned(),
            secret,
            permissions: None,
        }
    }
}

/// Every user a server needs: each service with its permissions on
/// `prefix`/`stream`, and the operator; `secret` gives each its secret by
/// name.
pub fn users(prefix: &str, stream: &str, secret: impl Fn(&str) -> Secret) -> Vec<User> {
    SERVICES
        .iter()
        .map(|acl| User::service(acl, secret(acl.name), prefix, stream))
        .chain([User::operator(secret(OPERATOR))])
        .collect()
}

/// Server-side TLS: the server's certificate and key, and the CA that
/// client certificates must be signed by (then required).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerTls {
    pub cert_file: String,
    pub key_file: String,
    pub client_ca_file: Option<String>,
}

/// Where and how a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSettings {
    pub host: String,
    pub port: u16,
    pub store_dir: String,
    pub tls: Option<ServerTls>,
}

/// A JetStream cluster of servers that find each other by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Cluster {
    pub name: String,
    /// This server's name, unique in the cluster (`$POD_NAME` reads it
    /// from the environment).
    pub server_name: String,
    pub port: u16,
    /// Every member's route URL (`nats://nats-0.nats:6222`, …).
    pub routes: Vec<String>,
}

/// [`server_config`] for a clustered server with a monitoring port.
pub fn cluster_config(
    settings: &ServerSettings,
    cluster: &Cluster,
    monitor_port: u16,
    users: &[User],
) -> String {
    let mut c = server_config(settings, users);
    let _ = writeln!(c, "server_name: {}", cluster.server_name);
    let _ = writeln!(c, "http_port: {monitor_port}");
    let routes: Vec<String> = cluster.routes.iter().map(|r| quote(r)).collect();
    let _ = writeln!(
        c,
        "cluster {{\n  name: {}\n  port: {}\n  routes: [{}]\n}}",
        quote(&cluster.name),
        cluster.port,
        routes.join(", ")
    );
    c
}

/// The server configuration the Kubernetes manifests ship: the services'
/// users with passwords from the environment (`ALLOCATION_NATS_PASSWORD`,
/// …, [`password_env`]), JetStream on the pod's volume, and with `members`
/// above one a cluster of the StatefulSet's pods `nats-0` … (`members`
/// of one: a single server).
pub fn kubernetes_config(members: usize) -> String {
    let users = users("gpualloc", "GPUALLOC", |name| {
        Secret::PasswordFromEnv(password_env(name))
    });
    let settings = ServerSettings {
        host: "0.0.0.0".into(),
        port: 4222,
        store_dir: "/data".into(),
        tls: None,
    };
    let cluster = Cluster {
        name: "gpualloc".into(),
        server_name: "$POD_NAME".into(),
        port: 6222,
        routes: (0..members)
            .map(|i| format!("nats://nats-{i}.nats:6222"))
            .collect(),
    };
    if members > 1 {
        cluster_config(&settings, &cluster, 8222, &users)
    } else {
        let mut c = server_config(&settings, &users);
        let _ = writeln!(c, "server_name: $POD_NAME\nhttp_port: 8222");
        c
    }
}

/// The environment variable holding `user`'s password in
/// [`kubernetes_config`].
pub fn password_env(user: &str) -> String {
    format!("{}_NATS_PASSWORD", user.to_uppercase().replace('-', "_"))
}

fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

fn list(items: &[String]) -> String {
    let quoted: Vec<String> = items.iter().map(|s| quote(s)).collect();
    format!("[{}]", quoted.join(", "))
}

/// A nats-server configuration: JetStream, one account with the given
/// users (no anonymous access: there is no `no_auth_user`), optional TLS.
pub fn server_config(settings: &ServerSettings, users: &[User]) -> String {
    let mut c = String::new();
    let _ = writeln!(
        c,
        "# Generated by gpualloc-nats-acl: one user per gpualloc service, each\n\
         # allowed to publish only its own events; anonymous clients are refused."
    );
    let _ = writeln!(c, "host: {}", quote(&settings.host));
    let _ = writeln!(c, "port: {}", settings.port);
    let _ = writeln!(
        c,
        "jetstream {{\n  store_dir: {}\n}}",
        quote(&settings.store_dir)
    );
    if let Some(tls) = &settings.tls {
        let _ = writeln!(c, "tls {{");
        let _ = writeln!(c, "  cert_file: {}", quote(&tls.cert_file));
        let _ = writeln!(c, "  key_file: {}", quote(&tls.key_file));
        if let Some(ca) = &tls.client_ca_file {
            let _ = writeln!(c, "  ca_file: {}\n  verify: true", quote(ca));
        }
        let _ = writeln!(c, "}}");
    }
    let _ = writeln!(
        c,
        "accounts {{\n  GPUALLOC {{\n    jetstream: enabled\n    users: ["
    );
    for u in users {
        let who = match &u.secret {
            Secret::Password(p) => format!("user: {}, password: {}", quote(&u.name), quote(p)),
            Secret::PasswordFromEnv(var) => {
                format!("user: {}, password: ${var}", quote(&u.name))
            }
            Secret::Nkey(k) => format!("nkey: {}", quote(k)),
        };
        match &u.permissions {
            None => {
                let _ = writeln!(c, "      {{ {who} }}");
            }
            Some(p) => {
                let _ = writeln!(
                    c,
                    "      {{ {who}, permissions: {{\n          publish: {{ allow: {} }}\n          subscribe: {{ allow: {} }}\n      }} }}",
                    list(&p.publish),
                    list(&p.subscribe)
                );
            }
        }
    }
    let _ = writeln!(c, "    ]\n  }}\n}}");
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_publish_only_their_own_events() {
        let alloc = permissions(&SERVICES[0], "gpualloc", "GPUALLOC");
        assert!(
            alloc
                .publish
                .contains(&"gpualloc.saga.allocation.requested".to_owned())
        );
        assert!(
            !alloc
                .publish
                .iter()
                .any(|s| s.contains("reservation") || s.contains(">") && !s.starts_with("$JS"))
        );
        assert!(!alloc.publish.iter().any(|s| s.contains("STREAM.DELETE")
            || s.contains("STREAM.PURGE")
            || s.contains("STREAM.UPDATE")));
        let viewer = permissions(&SERVICES[2], "gpualloc", "GPUALLOC");
        assert!(viewer.publish.iter().all(|s| s.starts_with('$')));
        assert_eq!(viewer.subscribe, vec!["_INBOX_viewer.>".to_owned()]);
        // Every event subject has exactly one publisher.
        for s in [
            subjects::ALLOCATION_REQUESTED,
            subjects::ALLOCATION_CANCELLED,
            subjects::ALLOCATION_RENEWAL_REQUESTED,
            subjects::ALLOCATION_CHANGED,
            subjects::RESERVATION_GRANTED,
            subjects::RESERVATION_HELD,
            subjects::RESERVATION_REJECTED,
            subjects::RESERVATION_RELEASED,
            subjects::RESERVATION_NEEDS_APPROVAL,
            subjects::RESERVATION_RENEWED,
            subjects::QUOTA_CHANGED,
            subjects::POOL_CHANGED,
        ] {
            assert_eq!(
                SERVICES.iter().filter(|a| a.publishes.contains(&s)).count(),
                1,
                "{s}"
            );
        }
    }

    #[test]
    fn the_config_quotes_what_it_embeds() {
        let c = server_config(
            &ServerSettings {
                host: "127.0.0.1".into(),
                port: 4222,
                store_dir: "/tmp/x".into(),
                tls: None,
            },
            &[User::operator(Secret::Password("a\"b".into()))],
        );
        assert!(c.contains(r#"password: "a\"b""#), "{c}");
        assert!(c.contains("jetstream: enabled"));
    }
}
