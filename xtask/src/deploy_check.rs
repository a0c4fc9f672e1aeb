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
//!   Kubernetes schemas (`kubernetes-validate`). The cross-checks against
//!   the code (ports, settings, probes) are a Rust test,
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
        for (name, rendered) in &overlays {
            let mut cmd = Command::new(&validate);
            cmd.env("PYTHONPATH", install::pip_home(&validate))
                .args(["--strict", "--quiet", "-k", KUBERNETES_VERSION])
                .arg(rendered);
            crate::procs::run(&format!("kubernetes-validate --strict ({name})"), &mut cmd)?;
        }
        Ok::<_, anyhow::Error>(overlays.len())
    })();
    let _ = std::fs::remove_dir_all(&scratch);
    let overlays = result?;
    eprintln!(
        "xtask: deploy-check passed (Dockerfile: hadolint, binaries {bins:?}; {overlays} overlays rendered and validated strictly)"
    );
    Ok(())
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

/// The Kubernetes version the manifests are validated against.
pub const KUBERNETES_VERSION: &str = "1.32.0";

/// Renders every overlay of `deploy/overlays` into `scratch`; returns
/// (overlay, rendered file). The git-ignored secret files are made from
/// their examples in a copy of `deploy/`, never in the work tree.
pub fn render_overlays(
    root: &Path,
    kubectl: &Path,
    scratch: &Path,
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let copy = scratch.join("deploy");
    copy_tree(&root.join("deploy"), &copy)?;
    fill_secrets(&copy)?;
    let mut overlays: Vec<PathBuf> = std::fs::read_dir(copy.join("overlays"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("kustomization.yaml").exists())
        .collect();
    overlays.sort();
    let mut out = Vec::new();
    for dir in overlays {
        let name = dir
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default()
            .to_owned();
        let output = Command::new(kubectl)
            .arg("kustomize")
            .arg(&dir)
            .output()
            .with_context(|| format!("running kubectl kustomize {}", dir.display()))?;
        if !output.status.success() {
            bail!(
                "kubectl kustomize deploy/overlays/{name} failed:\n{}",
                String::from_utf8_lossy(&output.stderr)
            );
        }
        let file = scratch.join(format!("{name}.yaml"));
        std::fs::write(&file, &output.stdout)?;
        out.push((name, file));
    }
    if out.is_empty() {
        bail!("no overlays under deploy/overlays");
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
