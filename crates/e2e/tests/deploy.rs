//! The Kubernetes manifests agree with the code. Every overlay of
//! `deploy/overlays` is rendered with `kubectl kustomize` (in a scratch
//! copy whose git-ignored secret files come from their examples) and
//! checked against the services themselves:
//!
//! - each Deployment runs a service binary, and its gRPC and metrics
//!   ports are the service's defaults, in the container, the listen
//!   settings and the Service;
//! - every setting a manifest gives (container env, the settings
//!   ConfigMap, the secret examples) is one the service reads;
//! - the probes ask the health service for the service's real name.
//!
//! - the mesh (`istio/`): every path an AuthorizationPolicy allows is an
//!   RPC of the descriptor set on the service it selects, every RPC is
//!   allowed, only to callers with a verified token, the admin-only ones
//!   (the matrix of docs/security.md) only with the admin role, CheckQuota
//!   also from the allocation service; the token rules are the services'
//!   identity settings and the claim headers are `mesh` mode's; the
//!   gateway routes every service and strips client copies of the
//!   identity headers; every external host the services call has a
//!   ServiceEntry; NATS and the metrics ports admit only their callers;
//! - monitoring: the PrometheusRule holds the alert rules of
//!   `prometheus/alerts.yml`, the ServiceMonitors scrape every service;
//! - the viewer's rate card and notification channels load with the
//!   viewer's own parsers, and every secret they name is in the example;
//! - production's PostgreSQL: each service's database URL names a login
//!   role and a database of the CloudNativePG cluster that it owns.
//!
//! `cargo xtask deploy-check` validates the same renderings against the
//! Kubernetes schemas and the custom resources' schemas; this test proves
//! each kind of check here catches a broken manifest.

#![allow(clippy::unwrap_used)]

use std::{collections::BTreeSet, path::Path, process::Command};

use clap::CommandFactory;
use serde_yaml::Value;

struct Service {
    binary: &'static str,
    name: &'static str,
    health: &'static str,
    settings: BTreeSet<String>,
    grpc_port: u16,
}

fn env_names(cmd: clap::Command) -> BTreeSet<String> {
    cmd.get_arguments()
        .filter_map(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned())
        .collect()
}

fn default_port(cmd: &clap::Command) -> u16 {
    let listen = cmd
        .get_arguments()
        .find(|a| a.get_id() == "listen")
        .unwrap()
        .get_default_values()[0]
        .to_string_lossy()
        .into_owned();
    listen.rsplit(':').next().unwrap().parse().unwrap()
}

fn services() -> Vec<Service> {
    let a = gpualloc_allocation::Config::command();
    let p = gpualloc_resource_pool::Config::command();
    let v = gpualloc_viewer::Config::command();
    vec![
        Service {
            binary: "gpualloc-allocation",
            name: "allocation",
            health: gpualloc_allocation::SERVICE_NAME,
            grpc_port: default_port(&a),
            settings: env_names(a),
        },
        Service {
            binary: "gpualloc-resource-pool",
            name: "resource-pool",
            health: gpualloc_resource_pool::SERVICE_NAME,
            grpc_port: default_port(&p),
            settings: env_names(p),
        },
        Service {
            binary: "gpualloc-viewer",
            name: "viewer",
            health: gpualloc_viewer::SERVICE_NAME,
            grpc_port: default_port(&v),
            settings: env_names(v),
        },
    ]
}

fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_tree(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}

/// Makes every git-ignored `secrets/*.env` under `dir` from its example;
/// collects the keys of the services' secrets (the NATS servers' and the
/// database's are checked apart).
fn fill_secrets(dir: &Path, service_keys: &mut BTreeSet<String>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            fill_secrets(&path, service_keys);
            continue;
        }
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let Some(real) = name.strip_suffix(".example") else {
            continue;
        };
        let text = std::fs::read_to_string(&path).unwrap();
        let service = ["allocation.", "resource-pool.", "viewer."]
            .iter()
            .any(|p| real.starts_with(p));
        for line in text.lines().filter(|l| service && !l.starts_with('#')) {
            if let Some((k, _)) = line.split_once('=') {
                service_keys.insert(k.trim().to_owned());
            }
        }
        std::fs::write(path.with_file_name(real), text).unwrap();
    }
}

/// (overlay, its objects, the secret examples' keys).
fn rendered() -> (Vec<(String, Vec<Value>)>, BTreeSet<String>) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let scratch = tempfile::tempdir().unwrap();
    let copy = scratch.path().join("deploy");
    copy_tree(&root.join("deploy"), &copy);
    // The overlays include ../../../istio.
    copy_tree(&root.join("istio"), &scratch.path().join("istio"));
    let mut secret_keys = BTreeSet::new();
    fill_secrets(&copy, &mut secret_keys);
    let mut out = Vec::new();
    let mut overlays: Vec<_> = std::fs::read_dir(copy.join("overlays"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    overlays.sort();
    for dir in overlays {
        let kubectl = Command::new("kubectl")
            .arg("kustomize")
            .arg(&dir)
            .output()
            .expect("kubectl (cargo xtask test installs it)");
        assert!(
            kubectl.status.success(),
            "{}",
            String::from_utf8_lossy(&kubectl.stderr)
        );
        let docs: Vec<Value> = serde_yaml::Deserializer::from_slice(&kubectl.stdout)
            .map(|d| serde::Deserialize::deserialize(d).unwrap())
            .collect();
        out.push((dir.file_name().unwrap().to_str().unwrap().to_owned(), docs));
    }
    (out, secret_keys)
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        other => format!("{other:?}"),
    }
}

/// Problems of one overlay's objects against the code.
fn check(objects: &[Value], secret_keys: &BTreeSet<String>) -> Vec<String> {
    let services = services();
    let mut problems = Vec::new();
    let kind = |o: &Value, k: &str| o["kind"].as_str() == Some(k);
    let settings_map: Vec<String> = objects
        .iter()
        .filter(|o| kind(o, "ConfigMap"))
        .filter(|o| {
            o["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("gpualloc-settings"))
        })
        .flat_map(|o| {
            o["data"]
                .as_mapping()
                .map(|m| m.keys().map(str_of).collect::<Vec<_>>())
                .unwrap_or_default()
        })
        .collect();
    let deployments: Vec<&Value> = objects.iter().filter(|o| kind(o, "Deployment")).collect();
    for svc in &services {
        let Some(d) = deployments.iter().find(|d| {
            d["spec"]["template"]["spec"]["containers"][0]["command"][0].as_str()
                == Some(&format!("/usr/local/bin/{}", svc.binary))
        }) else {
            problems.push(format!("no Deployment runs {}", svc.binary));
            continue;
        };
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        let port = |name: &str| {
            c["ports"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|p| p["name"].as_str() == Some(name))
                .and_then(|p| p["containerPort"].as_u64())
        };
        let metrics = metrics_port(svc.name);
        if port("grpc") != Some(u64::from(svc.grpc_port)) {
            problems.push(format!(
                "{}: container port grpc is {:?}, the service listens on {}",
                svc.name,
                port("grpc"),
                svc.grpc_port
            ));
        }
        if port("http-metrics") != Some(u64::from(metrics)) {
            problems.push(format!(
                "{}: container port http-metrics is {:?}, the service serves metrics on {metrics}",
                svc.name,
                port("http-metrics")
            ));
        }
        let env: Vec<(String, String)> = c["env"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|e| (str_of(&e["name"]), str_of(&e["value"])))
            .collect();
        for (name, value) in &env {
            if !svc.settings.contains(name) {
                problems.push(format!("{}: {name} is not a setting it reads", svc.name));
            }
            let expect = match name.as_str() {
                "GPUALLOC_LISTEN" => Some(svc.grpc_port),
                "GPUALLOC_METRICS_LISTEN" => Some(metrics),
                _ => None,
            };
            if let Some(p) = expect
                && !value.ends_with(&format!(":{p}"))
            {
                problems.push(format!("{}: {name}={value}, not port {p}", svc.name));
            }
        }
        for name in settings_map.iter().chain(secret_keys) {
            if !svc.settings.contains(name)
                && name != gpualloc_platform::telemetry::OTLP_ENDPOINT_ENV
            {
                problems.push(format!(
                    "{}: {name} (ConfigMap or Secret) is not a setting it reads",
                    svc.name
                ));
            }
        }
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            let g = &c[probe]["grpc"];
            if g["port"].as_u64() != Some(u64::from(svc.grpc_port)) {
                problems.push(format!("{}: {probe} port is not the gRPC port", svc.name));
            }
            if let Some(s) = g["service"].as_str()
                && s != svc.health
                && !s.is_empty()
            {
                problems.push(format!(
                    "{}: {probe} asks for health of {s:?}, the service reports {:?}",
                    svc.name, svc.health
                ));
            }
        }
        let service = objects
            .iter()
            .find(|o| kind(o, "Service") && o["metadata"]["name"].as_str() == Some(svc.name));
        let grpc = service.and_then(|s| {
            s["spec"]["ports"]
                .as_sequence()?
                .iter()
                .find(|p| p["name"].as_str() == Some("grpc"))
                .cloned()
        });
        match grpc {
            Some(p)
                if p["port"].as_u64() == Some(u64::from(svc.grpc_port))
                    && p["appProtocol"].as_str() == Some("grpc") => {}
            _ => problems.push(format!(
                "{}: the Service has no port `grpc` {} with appProtocol grpc",
                svc.name, svc.grpc_port
            )),
        }
    }
    problems
}

/// The NATS side: the shipped configurations are what the bus
/// permissions generate, the services log in as their own users, the
/// Secret names every user's password, and production runs a cluster of
/// three with replicated streams.
fn check_nats(overlay: &str, objects: &[Value], nats_conf: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let members = if overlay == "production" { 3 } else { 1 };
    if nats_conf != gpualloc_nats_acl::kubernetes_config(members) {
        problems.push(format!(
            "{overlay}: the NATS configuration is not what the bus permissions generate (run `cargo xtask nats-conf`)"
        ));
    }
    let sts = objects.iter().find(|o| {
        o["kind"].as_str() == Some("StatefulSet") && o["metadata"]["name"].as_str() == Some("nats")
    });
    if sts.and_then(|s| s["spec"]["replicas"].as_u64()) != Some(members as u64) {
        problems.push(format!("{overlay}: NATS should run {members} servers"));
    }
    for d in objects
        .iter()
        .filter(|o| o["kind"].as_str() == Some("Deployment"))
    {
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        let name = d["metadata"]["name"].as_str().unwrap_or_default();
        let user = c["env"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|e| e["name"].as_str() == Some("GPUALLOC_NATS_USER"))
            .map(|e| str_of(&e["value"]));
        if user.as_deref() != Some(name) || gpualloc_nats_acl::service(name).is_none() {
            problems.push(format!("{overlay}: {name} logs into NATS as {user:?}"));
        }
    }
    let settings = objects.iter().find(|o| {
        o["kind"].as_str() == Some("ConfigMap")
            && o["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("gpualloc-settings"))
    });
    let replicas = settings.map(|s| str_of(&s["data"]["GPUALLOC_STREAM_REPLICAS"]));
    if members > 1 && replicas.as_deref() != Some("3") {
        problems.push(format!(
            "{overlay}: the stream is not replicated three times"
        ));
    }
    problems
}

#[test]
fn the_nats_configuration_is_generated_from_the_bus_permissions() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let (overlays, _) = rendered();
    let secret =
        std::fs::read_to_string(root.join("deploy/base/secrets/nats.env.example")).unwrap();
    for user in [
        gpualloc_nats_acl::ALLOCATION,
        gpualloc_nats_acl::RESOURCE_POOL,
        gpualloc_nats_acl::VIEWER,
        gpualloc_nats_acl::OPERATOR,
    ] {
        let var = gpualloc_nats_acl::password_env(user);
        assert!(
            secret.contains(&format!("{var}=")),
            "nats.env.example lacks {var}"
        );
    }
    for (name, objects) in &overlays {
        let file = if name == "production" {
            "deploy/overlays/production/nats.conf"
        } else {
            "deploy/base/nats/nats.conf"
        };
        let conf = std::fs::read_to_string(root.join(file)).unwrap();
        let problems = check_nats(name, objects, &conf);
        assert!(problems.is_empty(), "{}", problems.join("\n"));
        // Drift is caught: a permission edited by hand.
        let edited = conf.replacen("saga.allocation.requested", "saga.allocation.>", 1);
        assert!(!check_nats(name, objects, &edited).is_empty());
    }
}

#[test]
fn every_overlay_agrees_with_the_services() {
    let (overlays, secret_keys) = rendered();
    assert!(overlays.len() >= 2, "dev and production");
    for (name, objects) in &overlays {
        let problems = check(objects, &secret_keys);
        assert!(problems.is_empty(), "{name}:\n{}", problems.join("\n"));
        eprintln!(
            "deploy/overlays/{name}: {} objects agree with the code",
            objects.len()
        );
    }
}

#[test]
fn each_kind_of_drift_is_caught() {
    let (overlays, secret_keys) = rendered();
    let good = overlays[0].1.clone();
    let edit = |f: &dyn Fn(&mut Vec<Value>)| {
        let mut o = good.clone();
        f(&mut o);
        check(&o, &secret_keys)
    };
    let first_deployment = |o: &mut Vec<Value>| -> usize {
        o.iter()
            .position(|v| v["kind"].as_str() == Some("Deployment"))
            .unwrap()
    };
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "a container port that does not match",
            edit(&|o| {
                let i = first_deployment(o);
                o[i]["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] =
                    Value::from(50999);
            }),
        ),
        (
            "a setting no service reads",
            edit(&|o| {
                let i = first_deployment(o);
                let env = &mut o[i]["spec"]["template"]["spec"]["containers"][0]["env"];
                let mut e = serde_yaml::Mapping::new();
                e.insert("name".into(), "GPUALLOC_LISTN".into());
                e.insert("value".into(), "0.0.0.0:1".into());
                env.as_sequence_mut().unwrap().push(Value::Mapping(e));
            }),
        ),
        (
            "a probe asking for the wrong health name",
            edit(&|o| {
                let i = first_deployment(o);
                o[i]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["service"] =
                    Value::from("gpualloc.allocation.v1.Allocations");
            }),
        ),
        (
            "a service binary without a Deployment",
            edit(&|o| {
                let i = first_deployment(o);
                o.remove(i);
            }),
        ),
    ];
    for (what, problems) in cases {
        assert!(!problems.is_empty(), "{what} went unnoticed");
    }
}

// ---------------------------------------------------------------------
// The mesh, monitoring, the viewer's files and production's PostgreSQL.
// ---------------------------------------------------------------------

fn root() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn named<'a>(objects: &'a [Value], kind: &str) -> impl Iterator<Item = &'a Value> + 'a {
    let kind = kind.to_owned();
    objects
        .iter()
        .filter(move |o| o["kind"].as_str() == Some(kind.as_str()))
}

fn strings(v: &Value) -> Vec<String> {
    v.as_sequence().into_iter().flatten().map(str_of).collect()
}

/// The settings ConfigMap's values.
fn settings(objects: &[Value]) -> std::collections::BTreeMap<String, String> {
    named(objects, "ConfigMap")
        .filter(|o| {
            o["metadata"]["name"]
                .as_str()
                .is_some_and(|n| n.starts_with("gpualloc-settings"))
        })
        .flat_map(|o| {
            o["data"]
                .as_mapping()
                .into_iter()
                .flatten()
                .map(|(k, v)| (str_of(k), str_of(v)))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// The app label a gRPC service's package is served by.
fn app_of(rpc: &str) -> Option<&'static str> {
    [
        ("/gpualloc.allocation.", "allocation"),
        ("/gpualloc.resourcepool.", "resource-pool"),
        ("/gpualloc.viewer.", "viewer"),
    ]
    .into_iter()
    .find(|(p, _)| rpc.starts_with(p))
    .map(|(_, app)| app)
}

/// The public API's RPCs, from the descriptor set.
fn api_rpcs() -> BTreeSet<String> {
    gpualloc_platform::layers::metrics::known_methods()
        .iter()
        .filter(|m| m.starts_with("/gpualloc."))
        .cloned()
        .collect()
}

/// RPCs that only administrators may call: "A on A" is PERMISSION_DENIED
/// in the matrix of docs/security.md.
fn admin_only() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(root().join("docs/security.md")).unwrap();
    let table = doc
        .split("<!-- authz-matrix:begin -->")
        .nth(1)
        .and_then(|t| t.split("<!-- authz-matrix:end -->").next())
        .unwrap();
    table
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let rpc = cells.get(1)?.trim_matches('`');
            (rpc.starts_with("gpualloc.") && cells.get(3) == Some(&"PERMISSION_DENIED"))
                .then(|| format!("/{rpc}"))
        })
        .collect()
}

fn principal(namespace: &str, account: &str) -> String {
    format!("cluster.local/ns/{namespace}/sa/{account}")
}

/// The mesh's policies against the services.
fn check_istio(objects: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let settings = settings(objects);
    let setting = |name: &str, default: &str| {
        settings
            .get(name)
            .cloned()
            .unwrap_or_else(|| default.to_owned())
    };
    let tenant_claim = setting(
        "GPUALLOC_JWT_TENANT_CLAIM",
        gpualloc_auth::DEFAULT_TENANT_CLAIM,
    );
    let roles_claim = setting(
        "GPUALLOC_JWT_ROLES_CLAIM",
        gpualloc_auth::DEFAULT_ROLES_CLAIM,
    );
    let admin_role = setting("GPUALLOC_JWT_ADMIN_ROLE", gpualloc_auth::DEFAULT_ADMIN_ROLE);
    let namespace = objects
        .iter()
        .find_map(|o| o["metadata"]["namespace"].as_str())
        .unwrap_or("default")
        .to_owned();

    if !named(objects, "PeerAuthentication").any(|p| {
        p["spec"]["mtls"]["mode"].as_str() == Some("STRICT") && p["spec"]["selector"].is_null()
    }) {
        problems.push("no namespace-wide STRICT PeerAuthentication".into());
    }

    // Tokens: the services' own identity settings, and `mesh` mode's headers.
    let rules: Vec<&Value> = named(objects, "RequestAuthentication")
        .flat_map(|r| r["spec"]["jwtRules"].as_sequence().into_iter().flatten())
        .collect();
    if rules.len() != 1 {
        problems.push(format!("{} JWT rules, expected one", rules.len()));
    }
    for r in rules {
        for (field, setting_name) in [
            ("issuer", "GPUALLOC_JWT_ISSUER"),
            ("jwksUri", "GPUALLOC_JWKS"),
        ] {
            if r[field].as_str() != settings.get(setting_name).map(String::as_str) {
                problems.push(format!(
                    "RequestAuthentication {field} {:?} is not {setting_name} {:?}",
                    r[field].as_str(),
                    settings.get(setting_name)
                ));
            }
        }
        let audience = setting("GPUALLOC_JWT_AUDIENCE", gpualloc_auth::DEFAULT_AUDIENCE);
        if !strings(&r["audiences"]).contains(&audience) {
            problems.push(format!(
                "RequestAuthentication does not require audience {audience}"
            ));
        }
        if r["forwardOriginalToken"].as_bool() != Some(true) {
            problems.push("RequestAuthentication does not forward the token (jwt mode and CheckQuota need it)".into());
        }
        let copied: BTreeSet<(String, String)> = r["outputClaimToHeaders"]
            .as_sequence()
            .into_iter()
            .flatten()
            .map(|h| (str_of(&h["header"]), str_of(&h["claim"])))
            .collect();
        let expected: BTreeSet<(String, String)> = [
            (
                gpualloc_platform::identity::SUBJECT_HEADER,
                "sub".to_owned(),
            ),
            (
                gpualloc_platform::identity::TENANT_HEADER,
                tenant_claim.clone(),
            ),
            (
                gpualloc_platform::identity::ROLES_HEADER,
                roles_claim.clone(),
            ),
        ]
        .into_iter()
        .map(|(h, c)| (h.to_owned(), c))
        .collect();
        if copied != expected {
            problems.push(format!(
                "outputClaimToHeaders {copied:?} are not mesh mode's headers {expected:?}"
            ));
        }
    }

    // Authorization: deny by default, one ALLOW per RPC.
    let policies: Vec<&Value> = named(objects, "AuthorizationPolicy").collect();
    if !policies
        .iter()
        .any(|p| p["spec"].as_mapping().is_none_or(|m| m.is_empty()))
    {
        problems.push("no deny-by-default (empty) AuthorizationPolicy".into());
    }
    let gateway = principal("istio-system", "istio-ingressgateway-service-account");
    let allocation = principal(&namespace, "allocation");
    let api = api_rpcs();
    let admin = admin_only();
    let reflection = [
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
    ];
    // (rpc, from principal) that some rule allows with a request principal.
    let mut allowed: BTreeSet<(String, String)> = BTreeSet::new();
    let mut ports_from: Vec<(String, String, Vec<String>, Vec<String>)> = Vec::new();
    for p in &policies {
        let app = str_of(&p["spec"]["selector"]["matchLabels"]["app"]);
        if p["spec"]["action"].as_str().is_some_and(|a| a != "ALLOW") {
            problems.push(format!("{app}: only ALLOW policies are expected"));
        }
        for rule in p["spec"]["rules"].as_sequence().into_iter().flatten() {
            let sources: Vec<&Value> = rule["from"]
                .as_sequence()
                .into_iter()
                .flatten()
                .map(|f| &f["source"])
                .collect();
            let principals: Vec<String> = sources
                .iter()
                .flat_map(|s| strings(&s["principals"]))
                .collect();
            let namespaces: Vec<String> = sources
                .iter()
                .flat_map(|s| strings(&s["namespaces"]))
                .collect();
            let with_token = !sources.is_empty()
                && sources
                    .iter()
                    .all(|s| !strings(&s["requestPrincipals"]).is_empty());
            let admin_condition = rule["when"].as_sequence().into_iter().flatten().any(|w| {
                w["key"].as_str() == Some(&format!("request.auth.claims[{roles_claim}]"))
                    && strings(&w["values"]) == [admin_role.clone()]
            });
            for op in rule["to"]
                .as_sequence()
                .into_iter()
                .flatten()
                .map(|t| &t["operation"])
            {
                let ports = strings(&op["ports"]);
                if !ports.is_empty() {
                    ports_from.push((
                        app.clone(),
                        ports.join(","),
                        principals.clone(),
                        namespaces.clone(),
                    ));
                }
                for path in strings(&op["paths"]) {
                    if reflection.contains(&path.as_str()) {
                        continue;
                    }
                    if !api.contains(&path) {
                        problems.push(format!("{app}: {path} is not an RPC of the API"));
                        continue;
                    }
                    if app_of(&path) != Some(app.as_str()) {
                        problems.push(format!(
                            "{path} is allowed on {app}, which does not serve it"
                        ));
                    }
                    if !with_token {
                        problems.push(format!("{path} is allowed without a verified token"));
                        continue;
                    }
                    if admin.contains(&path) != admin_condition {
                        problems.push(format!(
                            "{path}: {} the admin role, the service's rule {}",
                            if admin_condition {
                                "requires"
                            } else {
                                "does not require"
                            },
                            if admin.contains(&path) {
                                "does"
                            } else {
                                "does not"
                            }
                        ));
                    }
                    for pr in &principals {
                        allowed.insert((path.clone(), pr.clone()));
                    }
                }
            }
        }
    }
    for rpc in &api {
        if !allowed.contains(&(rpc.clone(), gateway.clone())) {
            problems.push(format!("{rpc} is not allowed through the gateway"));
        }
    }
    let check_quota = "/gpualloc.resourcepool.v1.ResourcePoolService/CheckQuota".to_owned();
    if !allowed.contains(&(check_quota.clone(), allocation.clone())) {
        problems.push("CheckQuota is not allowed from the allocation service".into());
    }
    for (rpc, from) in &allowed {
        if *from != gateway && !(*rpc == check_quota && *from == allocation) {
            problems.push(format!("{rpc} is allowed from {from}"));
        }
    }
    // Ports: NATS's client port from the three services only, metrics from
    // the monitoring namespace only.
    let services: BTreeSet<String> = ["allocation", "resource-pool", "viewer"]
        .iter()
        .map(|a| principal(&namespace, a))
        .collect();
    for (app, ports, principals, namespaces) in &ports_from {
        let metrics = ["allocation", "resource-pool", "viewer"]
            .iter()
            .find(|s| *s == app)
            .map(|s| metrics_port(s).to_string());
        let ok = match (app.as_str(), ports.as_str()) {
            ("nats", "4222") | ("postgres", "5432") => {
                principals.iter().cloned().collect::<BTreeSet<_>>() == services
                    && namespaces.is_empty()
            }
            ("nats", "6222") => *principals == [principal(&namespace, "nats")],
            ("nats", "8222") => principals.is_empty() && *namespaces == ["monitoring"],
            (_, p) if Some(p.to_owned()) == metrics => {
                principals.is_empty() && *namespaces == ["monitoring"]
            }
            _ => false,
        };
        if !ok {
            problems.push(format!(
                "{app}: port {ports} is open to {principals:?} {namespaces:?}"
            ));
        }
    }
    for svc in ["allocation", "resource-pool", "viewer"] {
        let port = metrics_port(svc).to_string();
        if !ports_from.iter().any(|(a, p, _, _)| a == svc && *p == port) {
            problems.push(format!("{svc}: Prometheus cannot scrape port {port}"));
        }
    }
    if !ports_from
        .iter()
        .any(|(a, p, _, _)| a == "nats" && p == "4222")
    {
        problems.push("nats: the services cannot reach the client port".into());
    }

    // The gateway routes each service's prefix to it and strips the
    // identity headers on every route to a gpualloc service.
    let services = services_by_app();
    for vs in
        named(objects, "VirtualService").filter(|v| !strings(&v["spec"]["gateways"]).is_empty())
    {
        for (app, prefix, port) in &services {
            let route = vs["spec"]["http"]
                .as_sequence()
                .into_iter()
                .flatten()
                .find(|r| {
                    r["match"]
                        .as_sequence()
                        .into_iter()
                        .flatten()
                        .any(|m| m["uri"]["prefix"].as_str() == Some(prefix))
                });
            let Some(route) = route else {
                problems.push(format!("the gateway has no route for {prefix}"));
                continue;
            };
            let dest = &route["route"][0]["destination"];
            if dest["host"].as_str() != Some(app) || dest["port"]["number"].as_u64() != Some(*port)
            {
                problems.push(format!(
                    "{prefix} is routed to {:?}:{:?}",
                    dest["host"], dest["port"]["number"]
                ));
            }
            if !str_of(&route["retries"]["retryOn"])
                .split(',')
                .any(|c| c == "unavailable")
            {
                problems.push(format!("{prefix}: no retry on UNAVAILABLE"));
            }
        }
        for route in vs["spec"]["http"].as_sequence().into_iter().flatten() {
            let to_api = route["match"].as_sequence().into_iter().flatten().any(|m| {
                ["prefix", "exact"].iter().any(|k| {
                    m["uri"][*k]
                        .as_str()
                        .is_some_and(|u| u.starts_with("/gpualloc."))
                })
            });
            let removed = strings(&route["headers"]["request"]["remove"]);
            for h in [
                gpualloc_platform::identity::SUBJECT_HEADER,
                gpualloc_platform::identity::TENANT_HEADER,
                gpualloc_platform::identity::ROLES_HEADER,
            ] {
                if to_api && !removed.iter().any(|r| r == h) {
                    problems.push(format!(
                        "route {:?} passes a client's {h} on",
                        route["name"].as_str()
                    ));
                }
            }
        }
    }
    if named(objects, "VirtualService").all(|v| strings(&v["spec"]["gateways"]).is_empty()) {
        problems.push("no VirtualService on the gateway".into());
    }
    problems
}

/// (app, the gateway prefix of its gRPC service, its port).
fn services_by_app() -> Vec<(&'static str, String, u64)> {
    services()
        .into_iter()
        .map(|s| (s.name, format!("/{}/", s.health), u64::from(s.grpc_port)))
        .collect()
}

fn host_of(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host = authority.rsplit('@').next()?;
    Some(host.split(':').next()?.to_owned())
}

fn env_file(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .collect()
}

/// The viewer's files load with its own parsers, every secret they name
/// is in the example, and every host the services call outside the
/// cluster has a ServiceEntry under REGISTRY_ONLY egress.
fn check_egress(objects: &[Value], notify: &str, notify_env: &str) -> Vec<String> {
    use gpualloc_viewer::notifications::{Settings, Target};
    let mut problems = Vec::new();
    let env = env_file(notify_env);
    let settings = match Settings::parse_with_env(notify, &|name| env.get(name).cloned()) {
        Ok(s) => s,
        Err(e) => return vec![format!("notify.json does not load: {e:#}")],
    };
    let mut hosts: Vec<(String, String)> = Vec::new();
    if let Some(jwks) = self::settings(objects).get("GPUALLOC_JWKS")
        && let Some(h) = host_of(jwks)
    {
        hosts.push(("the JWKS".into(), h));
    }
    for c in &settings.channels {
        let url = match &c.target {
            Target::Webhook { url, .. } => url.clone(),
            Target::Slack { url } => url.value().to_owned(),
            Target::Kakao { base_url, .. } => base_url.clone(),
        };
        match host_of(&url) {
            Some(h) => hosts.push((format!("channel {}", c.name), h)),
            None => problems.push(format!("channel {}: no host in its URL", c.name)),
        }
    }
    let entries: BTreeSet<String> = named(objects, "ServiceEntry")
        .flat_map(|e| strings(&e["spec"]["hosts"]))
        .collect();
    for (what, host) in hosts {
        if !entries.contains(&host) {
            problems.push(format!("{what} calls {host}, which has no ServiceEntry"));
        }
    }
    if !named(objects, "Sidecar")
        .any(|s| s["spec"]["outboundTrafficPolicy"]["mode"].as_str() == Some("REGISTRY_ONLY"))
    {
        problems.push("egress is not REGISTRY_ONLY".into());
    }
    problems
}

/// The PrometheusRule is the alert rules file; every service is scraped.
fn check_monitoring(objects: &[Value], alerts: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let alerts: Value = serde_yaml::from_str(alerts).unwrap();
    let rules: Vec<&Value> = named(objects, "PrometheusRule").collect();
    if rules.len() != 1 || rules[0]["spec"]["groups"] != alerts["groups"] {
        problems.push(
            "the PrometheusRule is not prometheus/alerts.yml (run `cargo xtask alert-rules`)"
                .into(),
        );
    }
    for svc in services() {
        let scraped = named(objects, "ServiceMonitor").any(|m| {
            m["spec"]["selector"]["matchLabels"]["app"].as_str() == Some(svc.name)
                && m["spec"]["endpoints"][0]["port"].as_str() == Some("http-metrics")
        });
        if !scraped {
            problems.push(format!("no ServiceMonitor scrapes {}", svc.name));
        }
    }
    if !named(objects, "ConfigMap").any(|c| {
        c["metadata"]["labels"]["grafana_dashboard"].as_str() == Some("1")
            && !c["data"]["gpualloc.json"].is_null()
    }) {
        problems.push("no Grafana dashboard ConfigMap".into());
    }
    problems
}

fn secret_value(objects: &[Value], name: &str, key: &str) -> Option<String> {
    use base64::Engine as _;
    let s = named(objects, "Secret").find(|s| {
        s["metadata"]["name"]
            .as_str()
            .is_some_and(|n| n.rsplit_once('-').is_some_and(|(b, _)| b == name) || n == name)
    })?;
    // kustomize wraps long values over several lines.
    let raw: String = s["data"][key].as_str()?.split_whitespace().collect();
    let bytes = base64::engine::general_purpose::STANDARD.decode(raw).ok()?;
    String::from_utf8(bytes).ok()
}

/// Production: every service's database URL is a role of the CloudNativePG
/// cluster with a password Secret, on a database that role owns, through
/// the cluster's read-write Service.
fn check_postgres(objects: &[Value]) -> Vec<String> {
    let mut problems = Vec::new();
    let Some(cluster) = named(objects, "Cluster").next() else {
        return vec!["no CloudNativePG Cluster".into()];
    };
    let name = str_of(&cluster["metadata"]["name"]);
    if cluster["spec"]["instances"].as_u64() != Some(3) {
        problems.push("the PostgreSQL cluster does not have 3 instances".into());
    }
    for svc in ["allocation", "resource-pool", "viewer"] {
        let Some(url) = secret_value(objects, &format!("gpualloc-{svc}"), "GPUALLOC_DATABASE_URL")
        else {
            problems.push(format!("{svc}: no GPUALLOC_DATABASE_URL"));
            continue;
        };
        let rest = url.split_once("://").map(|(_, r)| r).unwrap_or_default();
        let (user, rest) = rest.split_once('@').unwrap_or_default();
        let user = user.split(':').next().unwrap_or_default();
        let host = rest.split([':', '/']).next().unwrap_or_default();
        let db = rest
            .split_once('/')
            .map(|(_, d)| d.split('?').next().unwrap_or_default())
            .unwrap_or_default();
        if host != format!("{name}-rw") {
            problems.push(format!("{svc}: connects to {host}, not {name}-rw"));
        }
        let role = cluster["spec"]["managed"]["roles"]
            .as_sequence()
            .into_iter()
            .flatten()
            .find(|r| r["name"].as_str() == Some(user));
        match role {
            Some(r) if r["login"].as_bool() == Some(true) => {
                let secret = str_of(&r["passwordSecret"]["name"]);
                if secret_value(objects, &secret, "username").as_deref() != Some(user) {
                    problems.push(format!(
                        "{svc}: the password Secret of role {user} is not for {user}"
                    ));
                }
            }
            _ => problems.push(format!(
                "{svc}: logs in as {user}, not a login role of {name}"
            )),
        }
        if !named(objects, "Database").any(|d| {
            d["spec"]["name"].as_str() == Some(db)
                && d["spec"]["owner"].as_str() == Some(user)
                && d["spec"]["cluster"]["name"].as_str() == Some(&name)
        }) {
            problems.push(format!(
                "{svc}: database {db} is not one {user} owns on {name}"
            ));
        }
    }
    problems
}

struct Files {
    notify: String,
    notify_env: String,
    alerts: String,
}

fn files() -> Files {
    let read = |p: &str| std::fs::read_to_string(root().join(p)).unwrap();
    Files {
        notify: read("deploy/base/config/notify.json"),
        notify_env: read("deploy/base/secrets/notify.env.example"),
        alerts: read("deploy/components/monitoring/prometheus/alerts.yml"),
    }
}

fn check_all(overlay: &str, objects: &[Value], f: &Files) -> Vec<String> {
    let mut p = check_istio(objects);
    p.extend(check_egress(objects, &f.notify, &f.notify_env));
    p.extend(check_monitoring(objects, &f.alerts));
    if overlay == "production" {
        p.extend(check_postgres(objects));
    }
    p
}

#[test]
fn the_mesh_monitoring_and_databases_agree_with_the_services() {
    let (overlays, _) = rendered();
    let f = files();
    for (name, objects) in &overlays {
        let problems = check_all(name, objects, &f);
        assert!(problems.is_empty(), "{name}:\n{}", problems.join("\n"));
    }
    // The rate card loads with the viewer's parser.
    gpualloc_viewer::usage::RateCard::load(&root().join("deploy/base/config/rate-card.json"))
        .unwrap();
}

#[test]
fn each_kind_of_mesh_drift_is_caught() {
    let (overlays, _) = rendered();
    let f = files();
    let (overlay, good) = overlays
        .iter()
        .find(|(n, _)| n == "production")
        .cloned()
        .unwrap();
    assert!(check_all(&overlay, &good, &f).is_empty());
    let edit = |f_: &dyn Fn(&mut Vec<Value>), files: &Files| {
        let mut o = good.clone();
        f_(&mut o);
        check_all(&overlay, &o, files)
    };
    let find = |o: &[Value], kind: &str, name: &str| {
        o.iter()
            .position(|v| {
                v["kind"].as_str() == Some(kind) && v["metadata"]["name"].as_str() == Some(name)
            })
            .unwrap()
    };
    let paths = |o: &mut Vec<Value>, policy: &str, rule: usize| -> Vec<Value> {
        let i = find(o, "AuthorizationPolicy", policy);
        o[i]["spec"]["rules"][rule]["to"][0]["operation"]["paths"]
            .as_sequence()
            .unwrap()
            .clone()
    };
    let set_paths = |o: &mut Vec<Value>, policy: &str, rule: usize, p: Vec<Value>| {
        let i = find(o, "AuthorizationPolicy", policy);
        o[i]["spec"]["rules"][rule]["to"][0]["operation"]["paths"] = Value::Sequence(p);
    };
    let cases: Vec<(&str, Vec<String>)> = vec![
        (
            "an RPC missing from the policies",
            edit(
                &|o| {
                    let mut p = paths(o, "viewer", 0);
                    p.retain(|v| {
                        v.as_str() != Some("/gpualloc.viewer.v1.ViewerService/GetUsageReport")
                    });
                    set_paths(o, "viewer", 0, p);
                },
                &f,
            ),
        ),
        (
            "a path that is not an RPC",
            edit(
                &|o| {
                    let mut p = paths(o, "viewer", 0);
                    p.push("/gpualloc.viewer.v1.ViewerService/GetUsageReports".into());
                    set_paths(o, "viewer", 0, p);
                },
                &f,
            ),
        ),
        (
            "an admin-only RPC without the admin role",
            edit(
                &|o| {
                    let mut p = paths(o, "resource-pool", 0);
                    p.push("/gpualloc.resourcepool.v1.ResourcePoolService/SetTenantQuota".into());
                    set_paths(o, "resource-pool", 0, p);
                },
                &f,
            ),
        ),
        (
            "an RPC allowed without a token",
            edit(
                &|o| {
                    let i = find(o, "AuthorizationPolicy", "allocation");
                    o[i]["spec"]["rules"][0]["from"][0]["source"]
                        .as_mapping_mut()
                        .unwrap()
                        .remove("requestPrincipals");
                },
                &f,
            ),
        ),
        (
            "a claim header mesh mode does not read",
            edit(
                &|o| {
                    let i = find(o, "RequestAuthentication", "gpualloc-jwt");
                    o[i]["spec"]["jwtRules"][0]["outputClaimToHeaders"][1]["header"] =
                        "x-gpualloc-tenant-id".into();
                },
                &f,
            ),
        ),
        (
            "an issuer the services do not trust",
            edit(
                &|o| {
                    let i = find(o, "RequestAuthentication", "gpualloc-jwt");
                    o[i]["spec"]["jwtRules"][0]["issuer"] = "https://other.example/".into();
                },
                &f,
            ),
        ),
        (
            "a gateway route that passes client identity headers on",
            edit(
                &|o| {
                    let i = find(o, "VirtualService", "gpualloc-api");
                    o[i]["spec"]["http"][1]
                        .as_mapping_mut()
                        .unwrap()
                        .remove("headers");
                },
                &f,
            ),
        ),
        (
            "NATS open to any workload",
            edit(
                &|o| {
                    let i = find(o, "AuthorizationPolicy", "nats");
                    o[i]["spec"]["rules"][0]["from"][0]["source"]["principals"]
                        .as_sequence_mut()
                        .unwrap()
                        .push("cluster.local/ns/gpualloc/sa/default".into());
                },
                &f,
            ),
        ),
        (
            "a notification host without a ServiceEntry",
            edit(
                &|o| {
                    let i = find(o, "ServiceEntry", "notify-kakao");
                    o.remove(i);
                },
                &f,
            ),
        ),
        (
            "alert rules edited in one place only",
            edit(
                &|_| {},
                &Files {
                    alerts: f.alerts.replacen("> 60", "> 90", 1),
                    notify: f.notify.clone(),
                    notify_env: f.notify_env.clone(),
                },
            ),
        ),
        (
            "a notification secret missing from the example",
            edit(
                &|_| {},
                &Files {
                    alerts: f.alerts.clone(),
                    notify: f.notify.clone(),
                    notify_env: f
                        .notify_env
                        .replace("ML_TEAM_HOOK_SECRET=", "ML_HOOK_SECRET="),
                },
            ),
        ),
        (
            "a database the service's role does not own",
            edit(
                &|o| {
                    let i = find(o, "Database", "gpualloc-viewer");
                    o[i]["spec"]["owner"] = "allocation".into();
                },
                &f,
            ),
        ),
    ];
    for (what, problems) in cases {
        assert!(!problems.is_empty(), "{what} went unnoticed");
        eprintln!("{what}: {}", problems[0]);
    }
}

/// The fault-injection demo delays and aborts CheckQuota — a real RPC —
/// on the pool's host, where the allocation service's calls go.
#[test]
fn the_fault_injection_demo_targets_check_quota() {
    let out = Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join("istio/demo"))
        .output()
        .expect("kubectl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let docs: Vec<Value> = serde_yaml::Deserializer::from_slice(&out.stdout)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect();
    let vs = named(&docs, "VirtualService").next().unwrap();
    assert_eq!(strings(&vs["spec"]["hosts"]), ["resource-pool"]);
    let faulty = vs["spec"]["http"]
        .as_sequence()
        .unwrap()
        .iter()
        .find(|r| !r["fault"].is_null())
        .unwrap();
    let path = str_of(&faulty["match"][0]["uri"]["exact"]);
    assert!(api_rpcs().contains(&path), "{path} is not an RPC");
    assert!(path.ends_with("/CheckQuota"));
    let port = faulty["route"][0]["destination"]["port"]["number"].as_u64();
    let pool = services()
        .into_iter()
        .find(|s| s.name == "resource-pool")
        .unwrap();
    assert_eq!(port, Some(u64::from(pool.grpc_port)));
    assert_eq!(
        faulty["fault"]["abort"]["grpcStatus"].as_str(),
        Some("UNAVAILABLE")
    );
}

/// Each service's default metrics port, from the service itself.
fn metrics_port(service: &str) -> u16 {
    match service {
        "allocation" => gpualloc_allocation::METRICS_PORT,
        "resource-pool" => gpualloc_resource_pool::METRICS_PORT,
        _ => gpualloc_viewer::METRICS_PORT,
    }
}
