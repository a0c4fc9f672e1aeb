//! Where to connect and who to be, like kubectl: named contexts in
//! `~/.config/gpualloc/config.toml`, the current one chosen with
//! `gpualloc config use-context`, every field overridable by a
//! `GPUALLOC_*` variable or a flag. Two contexts always exist: `local`
//! (tenant `demo`) and `local-admin` (an administrator), both for the mesh
//! of `cargo xtask up`, signing their tokens with its development key.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{Global, exit::Failure};

pub const LOCAL: &str = "local";
pub const LOCAL_ADMIN: &str = "local-admin";

/// The config file.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct ConfigFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// One context.
#[derive(Debug, Default, Clone, Deserialize, Serialize, PartialEq)]
#[serde(rename_all = "kebab-case", deny_unknown_fields)]
pub struct Context {
    /// One address for all three services (an Istio gateway routes by
    /// package).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_pool: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub viewer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// A command whose output is the token (run through `sh -c`), e.g.
    /// `cargo xtask token --tenant ml-team` or a cloud CLI.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_command: Option<String>,
    /// CA certificate (PEM) for `https://` addresses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// Everything a session needs, resolved.
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub context: String,
    pub allocation: String,
    pub resource_pool: String,
    pub viewer: String,
    pub token: Option<String>,
    pub ca_file: Option<PathBuf>,
}

/// `$GPUALLOC_CONFIG`, `--config`, else `$XDG_CONFIG_HOME/gpualloc/config.toml`
/// or `~/.config/gpualloc/config.toml`.
pub fn path(global: &Global) -> PathBuf {
    if let Some(p) = &global.config {
        return p.clone();
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
        .unwrap_or_else(|| PathBuf::from("."));
    base.join("gpualloc").join("config.toml")
}

pub fn load(path: &Path) -> Result<ConfigFile, Failure> {
    match std::fs::read_to_string(path) {
        Ok(text) => {
            toml::from_str(&text).map_err(|e| Failure::usage(format!("{}: {e}", path.display())))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(ConfigFile::default()),
        Err(e) => Err(Failure::other(format!("{}: {e}", path.display()))),
    }
}

pub fn save(path: &Path, file: &ConfigFile) -> Result<(), Failure> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .map_err(|e| Failure::other(format!("{}: {e}", dir.display())))?;
    }
    let text = toml::to_string_pretty(file).map_err(|e| Failure::other(e.to_string()))?;
    std::fs::write(path, text).map_err(|e| Failure::other(format!("{}: {e}", path.display())))
}

/// The state folder of `cargo xtask up`: `--state-dir`, else the first
/// `.gpualloc` found from the working directory upwards.
pub fn state_dir(global: &Global) -> Option<PathBuf> {
    if let Some(d) = &global.state_dir {
        return Some(d.clone());
    }
    let mut dir = std::env::current_dir().ok()?;
    loop {
        let candidate = dir.join(".gpualloc");
        if candidate.join("auth").is_dir() {
            return Some(candidate);
        }
        if !dir.pop() {
            return None;
        }
    }
}

fn local(admin: bool) -> Context {
    Context {
        allocation: Some("http://127.0.0.1:50051".into()),
        resource_pool: Some("http://127.0.0.1:50052".into()),
        viewer: Some("http://127.0.0.1:50053".into()),
        ..Context::default()
    }
    .with_dev_identity(admin)
}

impl Context {
    /// Marks the built-in contexts: their token comes from the dev key.
    fn with_dev_identity(mut self, admin: bool) -> Context {
        self.token_command = Some(if admin { "dev:admin" } else { "dev:demo" }.into());
        self
    }
}

/// The context in force and every override applied.
pub fn resolve(global: &Global) -> Result<Resolved, Failure> {
    let file = load(&path(global))?;
    let name = global
        .context
        .clone()
        .or(file.current_context.clone())
        .unwrap_or_else(|| LOCAL.to_owned());
    let ctx = match file.contexts.get(&name) {
        Some(c) => c.clone(),
        None if name == LOCAL => local(false),
        None if name == LOCAL_ADMIN => local(true),
        None => {
            return Err(Failure::usage(format!(
                "no context {name:?} in {} (known: {})",
                path(global).display(),
                known(&file).join(", ")
            )));
        }
    };
    let gateway = global.gateway.clone().or(ctx.gateway.clone());
    let pick = |flag: &Option<String>, own: &Option<String>, default: &str| -> String {
        flag.clone()
            .or_else(|| gateway.clone())
            .or_else(|| own.clone())
            .unwrap_or_else(|| default.to_owned())
    };
    let token = match (&global.token, &ctx.token, &ctx.token_command) {
        (Some(t), _, _) | (None, Some(t), _) => Some(t.clone()),
        (None, None, Some(cmd)) => Some(token_from(cmd, global)?),
        (None, None, None) => None,
    };
    Ok(Resolved {
        context: name,
        allocation: pick(
            &global.allocation_addr,
            &ctx.allocation,
            "http://127.0.0.1:50051",
        ),
        resource_pool: pick(
            &global.resource_pool_addr,
            &ctx.resource_pool,
            "http://127.0.0.1:50052",
        ),
        viewer: pick(&global.viewer_addr, &ctx.viewer, "http://127.0.0.1:50053"),
        token,
        ca_file: global.ca_file.clone().or(ctx.ca_file),
    })
}

/// The names of the contexts there are.
pub fn known(file: &ConfigFile) -> Vec<String> {
    let mut names: Vec<String> = file.contexts.keys().cloned().collect();
    for builtin in [LOCAL, LOCAL_ADMIN] {
        if !file.contexts.contains_key(builtin) {
            names.push(builtin.to_owned());
        }
    }
    names
}

/// Runs a token command (or signs a development token for `dev:…`).
fn token_from(cmd: &str, global: &Global) -> Result<String, Failure> {
    if let Some(who) = cmd.strip_prefix("dev:") {
        let dir = state_dir(global).ok_or_else(|| {
            Failure::usage(
                "no token: nothing is configured and no `cargo xtask up` state folder (.gpualloc) \
                 was found here or above; start the local mesh, pass --token or GPUALLOC_TOKEN, \
                 or add a context (gpualloc config set-context)",
            )
        })?;
        let key = dir.join("auth").join(gpualloc_auth::DEV_KEY_FILE);
        let pem = std::fs::read_to_string(&key)
            .map_err(|e| Failure::usage(format!("{}: {e}", key.display())))?;
        let issuer = gpualloc_auth::DevIssuer::from_pem(&pem).map_err(Failure::other)?;
        let ttl = std::time::Duration::from_secs(3600);
        let token = if who == "admin" {
            issuer.token("admin", None, &["admin"], ttl)
        } else {
            issuer.token(&format!("{who}-user"), Some(who), &[], ttl)
        };
        return token.map_err(Failure::other);
    }
    let out = std::process::Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map_err(|e| Failure::other(format!("token command {cmd:?}: {e}")))?;
    if !out.status.success() {
        return Err(Failure::other(format!(
            "token command {cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}
