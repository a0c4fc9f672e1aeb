//! `cargo xtask deploy-check`: what ships is what the workspace builds.
//! So far the container image: `hadolint` passes on the Dockerfile, and
//! the binaries it builds, copies and runs are exactly the services'
//! binaries of the workspace (a renamed or added service cannot be left
//! out of the image unnoticed). `cargo xtask test` runs it with the
//! linters.

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
    eprintln!("xtask: deploy-check passed (Dockerfile: hadolint, binaries {bins:?})");
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
