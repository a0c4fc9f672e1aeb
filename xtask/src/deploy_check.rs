//! `cargo xtask deploy-check`: what ships is what the workspace builds.
//!
//! - The container image: `hadolint` passes on the Dockerfile, and the
//!   binaries it builds, copies and runs are exactly the services'
//!   binaries of the workspace (a renamed or added service cannot be left
//!   out of the image unnoticed).
//! - The Kubernetes manifests: every overlay of `deploy/overlays` renders
//!   with `kubectl kustomize` (in a scratch copy where the git-ignored
//!   `secrets/*.env` files are made from their examples), and every rendered object
//!   validates strictly — an unknown field is an error — against the
//!   Kubernetes schemas (`kubernetes-validate`), and every custom resource
//!   (Istio, prometheus-operator, CloudNativePG) against its schema with
//!   unknown fields refused too (`assets/crd-check.mjs`). The
//!   cross-checks against the code (ports, settings, probes, RPC paths,
//!   identity headers, NATS permissions, egress hosts) are a Rust test,
//!   `crates/e2e/tests/deploy.rs`.
//!
//! `cargo xtask test` runs it with the linters.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::install;

/// The workspace's service binaries: the `[[bin]]`s of the service crates.
pub const SERVICE_CRATES: [&str; 3] = ["allocation", "resource-pool", "viewer"];

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: Args) -> anyhow::Result<()> {
    let root = crate::root();
    let hadolint = install::hadolint(&root.join("target/tools"))?;
    let dockerfile = root.join("Dockerfile");
    crate::procs::run(
        "hadolint Dockerfile",
        Command::new(&hadolint).arg(&dockerfile),
    )?;
    let text = std::fs::read_to_string(&dockerfile)
        .with_context(|| format!("reading {}", dockerfile.display()))?;
    let bins = service_binaries(&root)?;
    if let Err(problems) = check_dockerfile(&text, &bins) {
        bail!(
            "the Dockerfile does not match the workspace:\n  {}",
            problems.join("\n  ")
        );
    }

    let kubectl = install::kubectl()?;
    let validate = install::kubernetes_validate(&root.join("target/tools"))?;
    let scratch = std::env::temp_dir().join(format!("gpualloc-deploy-{}", std::process::id()));
    let result = (|| {
        let overlays = render_overlays(&root, &kubectl, &scratch)?;
        let models = install::crd_models(&root.join("target/tools"))?;
        let mut counts = Vec::new();
        for (name, rendered) in &overlays {
            let builtin = rendered.with_extension("builtin.yaml");
            let (yaml, kube, custom) = builtin_objects(rendered)?;
            counts.push(format!(
                "{name}: {kube} Kubernetes + {custom} custom objects"
            ));
            std::fs::write(&builtin, yaml)?;
            eprintln!("xtask: kubernetes-validate --strict ({name})");
            validate_builtin(&validate, &builtin)
                .with_context(|| format!("deploy/overlays/{name}"))?;
            crate::procs::run(
                &format!("custom resources, strictly ({name})"),
                &mut crd_check(&models, rendered, &root.join("deploy/schemas"))?,
            )?;
        }
        Ok::<_, anyhow::Error>(counts)
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    let counts = result?;
    eprintln!(
        "xtask: deploy-check passed (Dockerfile: hadolint, binaries {bins:?}; rendered and validated strictly: {})",
        counts.join("; ")
    );
    Ok(())
}

/// The strict check of the custom resources (Istio, prometheus-operator,
/// CloudNativePG); see the script's opening comment.
const CRD_CHECK: &str = include_str!("../assets/crd-check.mjs");

/// `kubernetes-validate --strict` of a file of Kubernetes' own objects. A
/// kind it has no schema for is an error here, not a warning: among
/// Kubernetes' own groups that is a typo (`Deploymnt`) or a removed
/// version. Custom resources go to [`crd_check`] instead.
fn validate_builtin(validate: &Path, file: &Path) -> anyhow::Result<()> {
    let out = Command::new(validate)
        .env("PYTHONPATH", install::pip_home(validate))
        .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
        .arg(file)
        .output()
        .context("running kubernetes-validate")?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if !out.status.success() || text.contains("Couldn't find schema") {
        bail!("kubernetes-validate --strict failed:\n{}", text.trim());
    }
    Ok(())
}

/// Whether an apiVersion belongs to Kubernetes itself (validated by
/// kubernetes-validate; the rest by `crd-check.mjs`, which skips these —
/// keep the two lists the same).
fn is_builtin(api_version: &str) -> bool {
    let group = api_version.rsplit_once('/').map_or("", |(g, _)| g);
    matches!(group, "" | "apps" | "batch" | "policy" | "autoscaling") || group.ends_with(".k8s.io")
}

/// The rendered file's objects of Kubernetes' own kinds, as YAML; how
/// many of them there are, and how many others.
fn builtin_objects(rendered: &Path) -> anyhow::Result<(String, usize, usize)> {
    let objects: Vec<serde_json::Value> = serde_json::from_str(&objects_as_json(rendered)?)?;
    let mut out = String::new();
    let mut kube = 0;
    for o in objects
        .iter()
        .filter(|o| o["apiVersion"].as_str().is_some_and(is_builtin))
    {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(o)?);
        kube += 1;
    }
    Ok((out, kube, objects.len() - kube))
}

/// The strict check of a rendered file's custom resources, run from the
/// folder of [`install::crd_models`].
fn crd_check(models: &Path, rendered: &Path, schemas: &Path) -> anyhow::Result<Command> {
    let script = models.join("crd-check.mjs");
    std::fs::write(&script, CRD_CHECK)?;
    let json = rendered.with_extension("json");
    std::fs::write(&json, objects_as_json(rendered)?)?;
    let mut cmd = Command::new("node");
    cmd.current_dir(models).arg(&script).arg(&json).arg(schemas);
    Ok(cmd)
}

/// A rendered multi-document YAML file as one JSON array of its objects.
fn objects_as_json(rendered: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(rendered)?;
    let mut objects = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value: serde_json::Value = serde::Deserialize::deserialize(doc)
            .with_context(|| format!("reading {}", rendered.display()))?;
        if !value.is_null() {
            objects.push(value);
        }
    }
    Ok(serde_json::to_string(&objects)?)
}

/// The NATS configurations the manifests ship, and how many members each
/// cluster has: one server in the base (dev), three in production.
pub const NATS_CONFS: [(&str, usize); 2] = [
    ("deploy/base/nats/nats.conf", 1),
    ("deploy/overlays/production/nats.conf", 3),
];

/// `cargo xtask nats-conf`: writes [`NATS_CONFS`] from the permissions.
pub fn write_nats_conf() -> anyhow::Result<()> {
    for (path, members) in NATS_CONFS {
        let file = crate::root().join(path);
        if let Some(dir) = file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&file, gpualloc_nats_acl::kubernetes_config(members))?;
        eprintln!("xtask: wrote {path}");
    }
    Ok(())
}

/// The alert rules of the Grafana/Prometheus setup, and the
/// prometheus-operator resource made from them.
pub const ALERTS: &str = "deploy/components/monitoring/prometheus/alerts.yml";
pub const PROMETHEUS_RULE: &str = "deploy/components/monitoring/prometheusrule.yaml";

/// `cargo xtask alert-rules`: writes [`PROMETHEUS_RULE`] from [`ALERTS`],
/// so that Prometheus installs with and without the operator alert on the
/// same rules (a test fails when the two differ).
pub fn write_alert_rules() -> anyhow::Result<()> {
    let root = crate::root();
    let alerts =
        std::fs::read_to_string(root.join(ALERTS)).with_context(|| format!("reading {ALERTS}"))?;
    std::fs::write(root.join(PROMETHEUS_RULE), prometheus_rule(&alerts))?;
    eprintln!("xtask: wrote {PROMETHEUS_RULE}");
    Ok(())
}

/// A `PrometheusRule` whose spec is the rule file `alerts` (its leading
/// comment dropped, every other line indented under `spec:`).
pub fn prometheus_rule(alerts: &str) -> String {
    let mut out = format!(
        "# Generated by `cargo xtask alert-rules` from {}; edit that file.\n\
         apiVersion: monitoring.coreos.com/v1\n\
         kind: PrometheusRule\n\
         metadata:\n  name: gpualloc\n  labels:\n    app.kubernetes.io/name: gpualloc\n\
         spec:\n",
        ALERTS.trim_start_matches("deploy/components/monitoring/")
    );
    for line in alerts.lines().skip_while(|l| l.starts_with('#')) {
        if line.is_empty() {
            out.push('\n');
        } else {
            out.push_str("  ");
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The Kubernetes version the manifests are validated against.
pub const KUBERNETES_VERSION: &str = "1.32.0";

/// Renders every overlay of `deploy/overlays`, and `istio/demo`, into `scratch`; returns
/// (overlay, rendered file). The git-ignored secret files are made from
/// their examples in a copy of `deploy/`, never in the work tree.
pub fn render_overlays(
    root: &Path,
    kubectl: &Path,
    scratch: &Path,
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    // The overlays include ../../../istio: the copy keeps the layout.
    let copy = scratch.join("deploy");
    copy_tree(&root.join("deploy"), &copy)?;
    copy_tree(&root.join("istio"), &scratch.join("istio"))?;
    fill_secrets(&copy)?;
    let mut overlays: Vec<PathBuf> = std::fs::read_dir(copy.join("overlays"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("kustomization.yaml").exists())
        .collect();
    overlays.sort();
    let mut dirs: Vec<(String, PathBuf)> = overlays
        .into_iter()
        .map(|d| {
            let name = d
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_owned();
            (name, d)
        })
        .collect();
    if dirs.is_empty() {
        bail!("no overlays under deploy/overlays");
    }
    // The fault-injection demo is applied on its own.
    dirs.push(("istio-demo".into(), scratch.join("istio/demo")));
    let mut out = Vec::new();
    for (name, dir) in dirs {
        let output = Command::new(kubectl)
            .arg("kustomize")
            .arg(&dir)
            .output()
            .with_context(|| format!("running kubectl kustomize {}", dir.display()))?;
        if !output.status.success() {
            bail!(
                "kubectl kustomize {name} failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let file = scratch.join(format!("{name}.yaml"));
        std::fs::write(&file, &output.stdout)?;
        out.push((name, file));
    }
    Ok(out)
}

/// Makes every git-ignored `secrets/*.env` of the tree under `dir` from
/// its committed `*.env.example`.
fn fill_secrets(dir: &Path) -> anyhow::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            fill_secrets(&path)?;
        } else if let Some(real) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".example"))
        {
            std::fs::copy(&path, path.with_file_name(real))?;
        }
    }
    Ok(())
}

fn copy_tree(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_tree(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

/// The binaries of the service crates, from their manifests (a crate
/// without `[[bin]]` builds one binary named after its package).
pub fn service_binaries(root: &Path) -> anyhow::Result<BTreeSet<String>> {
    let mut out = BTreeSet::new();
    for krate in SERVICE_CRATES {
        let manifest: PathBuf = root.join("crates").join(krate).join("Cargo.toml");
        let text = std::fs::read_to_string(&manifest)
            .with_context(|| format!("reading {}", manifest.display()))?;
        let name = text
            .lines()
            .skip_while(|l| l.trim() != "[package]")
            .find_map(|l| l.trim().strip_prefix("name = "))
            .map(|n| n.trim_matches('"').to_owned())
            .with_context(|| format!("no package name in {}", manifest.display()))?;
        out.insert(name);
    }
    Ok(out)
}

/// Problems with a Dockerfile that must build, copy and may run exactly
/// `bins`.
pub fn check_dockerfile(text: &str, bins: &BTreeSet<String>) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    // Logical lines: continuations joined.
    let joined = text.replace("\\\n", " ");
    let built: BTreeSet<String> = joined
        .lines()
        .filter(|l| l.trim_start().starts_with("RUN"))
        .flat_map(|l| l.split_whitespace())
        .filter_map(|w| w.strip_prefix("target/release/"))
        .map(str::to_owned)
        .collect();
    let copied: BTreeSet<String> = joined
        .lines()
        .filter(|l| l.trim_start().starts_with("COPY --from="))
        .filter_map(|l| l.split_whitespace().last())
        .filter_map(|dest| dest.strip_prefix("/usr/local/bin/"))
        .map(str::to_owned)
        .collect();
    if &built != bins {
        problems.push(format!(
            "it builds {built:?}, the workspace's services are {bins:?}"
        ));
    }
    if &copied != bins {
        problems.push(format!(
            "it copies {copied:?} into /usr/local/bin, the workspace's services are {bins:?}"
        ));
    }
    for l in joined.lines().filter(|l| {
        let t = l.trim_start();
        t.starts_with("ENTRYPOINT") || t.starts_with("CMD")
    }) {
        let runs = l
            .split('"')
            .find_map(|w| w.strip_prefix("/usr/local/bin/"))
            .unwrap_or_default();
        if !bins.contains(runs) {
            problems.push(format!("{} runs {runs:?}, not a service binary", l.trim()));
        }
    }
    if !joined.lines().any(|l| {
        let t = l.trim();
        t.starts_with("USER ") && !t.ends_with(" root") && !t.ends_with(" 0") && !t.contains(" 0:")
    }) {
        problems.push("no non-root USER".into());
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn bins() -> BTreeSet<String> {
        service_binaries(&crate::root()).unwrap()
    }

    fn dockerfile() -> String {
        std::fs::read_to_string(crate::root().join("Dockerfile")).unwrap()
    }

    #[test]
    fn the_dockerfile_ships_the_workspaces_services() {
        assert_eq!(bins().len(), 3);
        check_dockerfile(&dockerfile(), &bins()).unwrap();
    }

    #[test]
    fn a_dockerfile_that_drifts_from_the_workspace_fails() {
        let good = dockerfile();
        let cases = [
            // A service left out of the image.
            good.replace(
                "COPY --from=build /out/gpualloc-viewer /usr/local/bin/gpualloc-viewer\n",
                "",
            ),
            // A binary that no crate builds.
            good.replace(
                "target/release/gpualloc-viewer",
                "target/release/gpualloc-view",
            ),
            // Running something else.
            good.replace(
                r#"ENTRYPOINT ["/usr/local/bin/gpualloc-allocation"]"#,
                r#"ENTRYPOINT ["/usr/local/bin/sh"]"#,
            ),
            // As root.
            good.replace("USER 65532:65532", "USER root"),
        ];
        for (i, bad) in cases.iter().enumerate() {
            assert_ne!(bad, &good, "case {i} changed nothing");
            assert!(check_dockerfile(bad, &bins()).is_err(), "case {i} passed");
        }
    }

    /// Each object alone in a file: valid ones pass, each broken one fails.
    fn verdicts(check: &dyn Fn(&Path) -> bool, objects: &[(&str, &str)]) -> Vec<String> {
        static CALLS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let call = CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("xtask-schemas-{}-{call}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut wrong = Vec::new();
        for (i, (expect, yaml)) in objects.iter().enumerate() {
            let file = dir.join(format!("{i}.yaml"));
            std::fs::write(&file, yaml).unwrap();
            let passed = check(&file);
            if passed != (*expect == "valid") {
                wrong.push(format!(
                    "{expect} object {i} {}",
                    if passed { "passed" } else { "failed" }
                ));
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        wrong
    }

    const AUTHZ: &str = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: a\nspec:\n  action: ALLOW\n  rules:\n    - to:\n        - operation:\n            paths: [/x]\n";
    const CLUSTER: &str = "apiVersion: postgresql.cnpg.io/v1\nkind: Cluster\nmetadata:\n  name: pg\nspec:\n  instances: 3\n  storage:\n    size: 1Gi\n";
    const MONITOR: &str = "apiVersion: monitoring.coreos.com/v1\nkind: ServiceMonitor\nmetadata:\n  name: m\nspec:\n  selector: {}\n  endpoints:\n    - port: http-metrics\n";

    #[test]
    fn the_custom_resource_check_refuses_typos_bad_values_and_unknown_kinds() {
        let root = crate::root();
        let models = install::crd_models(&root.join("target/tools")).unwrap();
        let schemas = root.join("deploy/schemas");
        let check = |file: &Path| {
            crd_check(&models, file, &schemas)
                .unwrap()
                .output()
                .unwrap()
                .status
                .success()
        };
        let wrong = verdicts(
            &check,
            &[
                ("valid", AUTHZ),
                ("valid", CLUSTER),
                ("valid", MONITOR),
                // A typo deep inside an Istio object (the npm schema alone
                // would accept it).
                ("invalid", &AUTHZ.replace("paths:", "pathz:")),
                // A value outside an enum.
                ("invalid", &AUTHZ.replace("ALLOW", "PERMIT")),
                // A typo in a CloudNativePG object.
                ("invalid", &CLUSTER.replace("instances", "instance")),
                // A typo in a prometheus-operator object.
                ("invalid", &MONITOR.replace("port:", "prot:")),
                // A version no schema knows.
                ("invalid", &MONITOR.replace("/v1", "/v2")),
            ],
        );
        assert!(wrong.is_empty(), "{wrong:?}");
    }

    #[test]
    fn kubernetes_validate_refuses_unknown_fields() {
        let validate = install::kubernetes_validate(&crate::root().join("target/tools")).unwrap();
        let good = "apiVersion: v1\nkind: Service\nmetadata:\n  name: s\nspec:\n  ports:\n    - name: grpc\n      port: 50051\n      appProtocol: grpc\n";
        let check = |file: &Path| validate_builtin(&validate, file).is_ok();
        let wrong = verdicts(
            &check,
            &[
                ("valid", good),
                ("invalid", &good.replace("appProtocol", "appProtocl")),
                ("invalid", &good.replace("50051", "grpc-port")),
                // A kind of Kubernetes' own that does not exist.
                ("invalid", &good.replace("kind: Service", "kind: Servise")),
            ],
        );
        assert!(wrong.is_empty(), "{wrong:?}");
    }

    #[test]
    fn the_prometheus_rule_is_the_alert_file() {
        let alerts = std::fs::read_to_string(crate::root().join(ALERTS)).unwrap();
        let shipped = std::fs::read_to_string(crate::root().join(PROMETHEUS_RULE)).unwrap();
        assert_eq!(
            shipped,
            prometheus_rule(&alerts),
            "run `cargo xtask alert-rules`"
        );
    }

    #[test]
    fn hadolint_fails_a_careless_dockerfile() {
        let Ok(hadolint) = install::hadolint(&crate::root().join("target/tools")) else {
            panic!("hadolint could not be installed");
        };
        let dir = std::env::temp_dir().join(format!("xtask-hadolint-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let bad = dir.join("Dockerfile");
        // An untagged base image and `cd` in RUN: hadolint's DL3006, DL3003.
        std::fs::write(&bad, "FROM debian\nRUN cd /tmp && make\n").unwrap();
        let status = Command::new(&hadolint).arg(&bad).output().unwrap().status;
        let _ = std::fs::remove_dir_all(&dir);
        assert!(!status.success(), "hadolint passed a careless Dockerfile");
    }
}
