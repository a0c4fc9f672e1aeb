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
//! `cargo xtask deploy-check` validates the same renderings against the
//! Kubernetes schemas; this test proves each kind of check here catches a
//! broken manifest.

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
        let metrics = gpualloc_platform::host::default_metrics_port(svc.name);
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
            if !svc.settings.contains(name) {
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
