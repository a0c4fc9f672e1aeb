//! How a service knows who calls it. One setting, [`AuthMode`]:
//!
//! - `jwt` (the default everywhere): the service verifies the caller's
//!   `authorization: Bearer <JWT>` itself against a JWKS (file or URL),
//!   and strips every incoming `x-gpualloc-*` header — nobody is anyone
//!   they merely claim to be.
//! - `mesh`: Istio's RequestAuthentication verified the JWT at the sidecar
//!   and copied its claims into `x-gpualloc-subject`, `x-gpualloc-tenant`
//!   and `x-gpualloc-roles` (see `istio/`); the service trusts exactly
//!   those, refuses a request that carries one of them twice (a client's
//!   copy beside the proxy's), and is only valid behind the `istio/`
//!   policies that refuse token-less requests.
//!
//! There is no mode without identity. The verified [`Caller`] goes into
//! the request's extensions ([`crate::layers::auth`]).

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use gpualloc_auth::{AuthError, KeySet, Settings};
use gpualloc_domain::TenantId;
use http::HeaderMap;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::identity::{Caller, ROLES_HEADER, SUBJECT_HEADER, TENANT_HEADER};

/// Where identities come from.
#[derive(clap::ValueEnum, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuthMode {
    /// Verify bearer JWTs in the process.
    #[default]
    Jwt,
    /// Trust the identity headers Istio sets from a JWT it verified.
    Mesh,
}

/// Identity settings every service takes (`GPUALLOC_AUTH_*`, `GPUALLOC_JWT*`).
#[derive(clap::Args, Clone, Debug, PartialEq, Eq)]
pub struct AuthConfig {
    /// `jwt` (verify tokens here) or `mesh` (trust Istio's headers; only
    /// with the `istio/` policies).
    #[arg(long, env = "GPUALLOC_AUTH_MODE", value_enum, default_value_t)]
    pub auth_mode: AuthMode,

    /// The trusted keys: a JWKS file path or an `https://` URL (jwt mode).
    #[arg(long, env = "GPUALLOC_JWKS")]
    pub jwks: Option<String>,

    /// Required `iss` of tokens.
    #[arg(long, env = "GPUALLOC_JWT_ISSUER", default_value = gpualloc_auth::DEV_ISSUER)]
    pub jwt_issuer: String,

    /// Required `aud` of tokens.
    #[arg(long, env = "GPUALLOC_JWT_AUDIENCE", default_value = gpualloc_auth::DEFAULT_AUDIENCE)]
    pub jwt_audience: String,

    /// Claim with the caller's tenant (a dotted path reaches into objects).
    #[arg(long, env = "GPUALLOC_JWT_TENANT_CLAIM", default_value = gpualloc_auth::DEFAULT_TENANT_CLAIM)]
    pub jwt_tenant_claim: String,

    /// Claim with the caller's roles: an array, or a space/comma-separated
    /// string (`realm_access.roles` for Keycloak).
    #[arg(long, env = "GPUALLOC_JWT_ROLES_CLAIM", default_value = gpualloc_auth::DEFAULT_ROLES_CLAIM)]
    pub jwt_roles_claim: String,

    /// The role that grants the admin methods.
    #[arg(long, env = "GPUALLOC_JWT_ADMIN_ROLE", default_value = gpualloc_auth::DEFAULT_ADMIN_ROLE)]
    pub jwt_admin_role: String,

    /// Clock skew tolerated on `exp` and `nbf` (at most 60s).
    #[arg(long, env = "GPUALLOC_JWT_LEEWAY", default_value = "30s", value_parser = crate::config::parse_duration)]
    pub jwt_leeway: std::time::Duration,

    /// How often the JWKS is read again (new and removed keys); a token
    /// with an unknown `kid` also triggers a read, at most every
    /// `jwks_min_refetch`.
    #[arg(long, env = "GPUALLOC_JWKS_REFRESH", default_value = "5m", value_parser = crate::config::parse_duration)]
    pub jwks_refresh: std::time::Duration,

    #[arg(long, env = "GPUALLOC_JWKS_MIN_REFETCH", default_value = "10s", value_parser = crate::config::parse_duration)]
    pub jwks_min_refetch: std::time::Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            auth_mode: AuthMode::Jwt,
            jwks: None,
            jwt_issuer: gpualloc_auth::DEV_ISSUER.into(),
            jwt_audience: gpualloc_auth::DEFAULT_AUDIENCE.into(),
            jwt_tenant_claim: gpualloc_auth::DEFAULT_TENANT_CLAIM.into(),
            jwt_roles_claim: gpualloc_auth::DEFAULT_ROLES_CLAIM.into(),
            jwt_admin_role: gpualloc_auth::DEFAULT_ADMIN_ROLE.into(),
            jwt_leeway: Duration::from_secs(30),
            jwks_refresh: Duration::from_secs(300),
            jwks_min_refetch: Duration::from_secs(10),
        }
    }
}

impl AuthConfig {
    fn settings(&self) -> Settings {
        Settings {
            issuer: self.jwt_issuer.clone(),
            audience: self.jwt_audience.clone(),
            tenant_claim: self.jwt_tenant_claim.clone(),
            roles_claim: self.jwt_roles_claim.clone(),
            admin_role: self.jwt_admin_role.clone(),
            leeway: self.jwt_leeway.min(gpualloc_auth::MAX_LEEWAY),
        }
    }
}

/// The largest JWKS read (a real one is a few kilobytes).
const MAX_JWKS_BYTES: usize = 1024 * 1024;

/// Where the trusted keys are read from.
#[derive(Clone, Debug)]
enum Source {
    File(PathBuf),
    Url(String),
}

impl std::fmt::Display for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Source::File(p) => write!(f, "{}", p.display()),
            Source::Url(u) => f.write_str(&gpualloc_storage::redact_url(u)),
        }
    }
}

/// The trusted keys, read again on a schedule and on an unknown `kid`;
/// a failed read keeps the last good set.
#[derive(Debug)]
struct KeyCache {
    source: Source,
    keys: RwLock<Arc<KeySet>>,
    /// Bumped whenever the set of key ids changes: tokens verified under
    /// an older generation are verified again (a removed key stops
    /// admitting its tokens at once).
    generation: std::sync::atomic::AtomicU64,
    last_read: Mutex<Option<Instant>>,
    reading: tokio::sync::Mutex<()>,
    min_refetch: Duration,
    http: reqwest::Client,
}

impl KeyCache {
    fn new(source: Source, min_refetch: Duration) -> Result<KeyCache, String> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            // A JWKS URL that redirects elsewhere is not the one configured.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(KeyCache {
            source,
            keys: RwLock::new(Arc::new(KeySet::default())),
            generation: std::sync::atomic::AtomicU64::new(0),
            last_read: Mutex::new(None),
            reading: tokio::sync::Mutex::new(()),
            min_refetch,
            http,
        })
    }

    fn current(&self) -> Arc<KeySet> {
        match self.keys.read() {
            Ok(k) => k.clone(),
            Err(p) => p.into_inner().clone(),
        }
    }

    async fn fetch(&self) -> Result<KeySet, String> {
        let text = match &self.source {
            Source::File(p) => {
                let len = tokio::fs::metadata(p)
                    .await
                    .map_err(|e| format!("reading {}: {e}", p.display()))?
                    .len();
                if len > MAX_JWKS_BYTES as u64 {
                    return Err(format!(
                        "{} is {len} bytes; a JWKS is at most {MAX_JWKS_BYTES}",
                        p.display()
                    ));
                }
                tokio::fs::read_to_string(p)
                    .await
                    .map_err(|e| format!("reading {}: {e}", p.display()))?
            }
            Source::Url(u) => {
                let response = self
                    .http
                    .get(u)
                    .send()
                    .await
                    // Without the URL: it may carry a credential.
                    .map_err(|e| format!("fetching the JWKS: {}", e.without_url()))?;
                if !response.status().is_success() {
                    return Err(format!("fetching the JWKS: HTTP {}", response.status()));
                }
                // Read in chunks up to a cap: a compromised or broken
                // endpoint must not make every replica buffer gigabytes.
                let mut response = response;
                let mut body = Vec::new();
                while let Some(chunk) = response
                    .chunk()
                    .await
                    .map_err(|e| format!("reading the JWKS: {}", e.without_url()))?
                {
                    body.extend_from_slice(&chunk);
                    if body.len() > MAX_JWKS_BYTES {
                        return Err(format!("the JWKS is larger than {MAX_JWKS_BYTES} bytes"));
                    }
                }
                String::from_utf8(body).map_err(|_| "the JWKS is not UTF-8".to_owned())?
            }
        };
        KeySet::from_jwks(&text)
    }

    /// Reads the keys again; on failure keeps the last good set. Returns
    /// whether the set is usable.
    async fn refresh(&self) -> bool {
        let _one = self.reading.lock().await;
        self.refresh_locked().await
    }

    async fn refresh_locked(&self) -> bool {
        let result = self.fetch().await;
        if let Ok(mut t) = self.last_read.lock() {
            *t = Some(Instant::now());
        }
        match result {
            Ok(set) => {
                let changed = self.current().kids() != set.kids();
                if changed {
                    self.generation
                        .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    tracing::info!(source = %self.source, kids = ?set.kids(), ignored = set.ignored, "trusted keys loaded");
                }
                match self.keys.write() {
                    Ok(mut k) => *k = Arc::new(set),
                    Err(p) => *p.into_inner() = Arc::new(set),
                }
                true
            }
            Err(e) => {
                let kept = self.current();
                tracing::warn!(source = %self.source, error = %e, kept = kept.len(), "reading the trusted keys failed; keeping the last good set");
                !kept.is_empty()
            }
        }
    }

    /// A token named `kid`, which the current set lacks: read the keys
    /// again unless that was done within `min_refetch` (an attacker's
    /// random kids must not turn into a request flood on the IdP).
    async fn refetch_for(&self, kid: &str) -> Arc<KeySet> {
        let guard = self.reading.lock().await;
        // Another request may have read them while this one waited.
        if self.current().contains(kid) {
            return self.current();
        }
        let recent = self
            .last_read
            .lock()
            .ok()
            .and_then(|t| *t)
            .is_some_and(|t| t.elapsed() < self.min_refetch);
        if !recent {
            self.refresh_locked().await;
        }
        drop(guard);
        self.current()
    }
}

/// Bounded cache of verified tokens: verifying an ES256 signature costs
/// more CPU than most RPCs, and clients send the same token many times.
#[derive(Debug, Default)]
struct Verified {
    /// Token -> (caller, `exp`, key generation it was verified under).
    entries: Mutex<HashMap<String, (Caller, u64, u64)>>,
}

const VERIFIED_MAX: usize = 10_000;

impl Verified {
    fn get(&self, token: &str, generation: u64) -> Option<Caller> {
        let entries = self.entries.lock().ok()?;
        let (caller, exp, verified_under) = entries.get(token)?;
        (gpualloc_auth::now_unix() < *exp && *verified_under == generation).then(|| caller.clone())
    }

    fn put(&self, token: &str, caller: &Caller, exp: u64, generation: u64) {
        if let Ok(mut entries) = self.entries.lock() {
            if entries.len() >= VERIFIED_MAX {
                entries.clear();
            }
            entries.insert(token.to_owned(), (caller.clone(), exp, generation));
        }
    }
}

/// Turns a request's headers into a verified [`Caller`], per the mode.
#[derive(Clone, Debug)]
pub struct Authenticator(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    mode: AuthMode,
    settings: Settings,
    keys: Option<KeyCache>,
    verified: Verified,
    refresh: Duration,
}

impl Authenticator {
    /// Checks the settings and reads the keys once. A JWKS file that
    /// cannot be read is a configuration error; a URL that does not answer
    /// yet is retried in the background (requests are refused meanwhile).
    pub async fn new(config: &AuthConfig) -> anyhow::Result<Authenticator> {
        let settings = config.settings();
        let keys = match (config.auth_mode, config.jwks.as_deref().map(str::trim)) {
            (AuthMode::Mesh, _) => None,
            (AuthMode::Jwt, None | Some("")) => anyhow::bail!(
                "GPUALLOC_JWKS is not set: jwt mode verifies tokens against a JWKS file or URL \
                 (`cargo xtask up` makes a development one); there is no mode without identity"
            ),
            (AuthMode::Jwt, Some(s)) => {
                let source = if s.starts_with("https://") || s.starts_with("http://") {
                    Source::Url(s.to_owned())
                } else {
                    Source::File(PathBuf::from(s.strip_prefix("file://").unwrap_or(s)))
                };
                let cache = KeyCache::new(source.clone(), config.jwks_min_refetch)
                    .map_err(anyhow::Error::msg)?;
                if !cache.refresh().await {
                    if let Source::File(_) = source {
                        anyhow::bail!("no usable trusted keys in {source}");
                    }
                    tracing::error!(%source, "no trusted keys yet; requests are refused until the JWKS can be read");
                }
                Some(cache)
            }
        };
        if config.auth_mode == AuthMode::Mesh {
            tracing::warn!(
                "auth mode `mesh`: identity headers set by Istio are trusted; valid only behind the istio/ policies"
            );
        }
        Ok(Authenticator(Arc::new(Inner {
            mode: config.auth_mode,
            settings,
            keys,
            verified: Verified::default(),
            refresh: config.jwks_refresh,
        })))
    }

    pub fn mode(&self) -> AuthMode {
        self.0.mode
    }

    /// Reads the keys again every `refresh` until `cancel` fires.
    pub fn spawn_refresh(&self, cancel: CancellationToken) {
        let me = self.clone();
        tokio::spawn(async move {
            let Some(keys) = &me.0.keys else { return };
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(me.0.refresh) => {}
                }
                keys.refresh().await;
            }
        });
    }

    /// The caller of a request with these headers.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Caller, Status> {
        match self.0.mode {
            AuthMode::Jwt => self.verify_token(headers).await,
            AuthMode::Mesh => from_mesh_headers(headers, &self.0.settings.admin_role),
        }
    }

    async fn verify_token(&self, headers: &HeaderMap) -> Result<Caller, Status> {
        let refuse = |e: AuthError| Status::unauthenticated(e.to_string());
        if headers.get_all(http::header::AUTHORIZATION).iter().count() > 1 {
            return Err(Status::unauthenticated(
                "more than one authorization header",
            ));
        }
        let header = headers
            .get(http::header::AUTHORIZATION)
            .map(|v| v.to_str().map_err(|_| AuthError::NotBearer))
            .transpose()
            .map_err(refuse)?;
        let token = gpualloc_auth::bearer(header).map_err(refuse)?;
        let Some(cache) = &self.0.keys else {
            return Err(Status::unauthenticated("no trusted keys are configured"));
        };
        // Read before the keys: an entry is never tagged newer than the
        // keys it was verified with.
        let mut generation = cache.generation.load(std::sync::atomic::Ordering::SeqCst);
        if let Some(caller) = self.0.verified.get(token, generation) {
            return Ok(caller);
        }
        let mut keys = cache.current();
        let result = match gpualloc_auth::verify(token, &keys, &self.0.settings) {
            Err(AuthError::UnknownKey(_)) | Err(AuthError::NoKeyId(0)) => {
                // Keys rotate: a new kid is worth one more read.
                let kid = gpualloc_auth::key_id(token).unwrap_or_default();
                generation = cache.generation.load(std::sync::atomic::Ordering::SeqCst);
                keys = cache.refetch_for(&kid).await;
                if keys.is_empty() {
                    return Err(Status::unauthenticated(
                        "no trusted keys could be loaded yet; retry later",
                    ));
                }
                gpualloc_auth::verify(token, &keys, &self.0.settings)
            }
            other => other,
        };
        let identity = result.map_err(refuse)?;
        let expires_at = identity.expires_at;
        let tenant = identity
            .tenant
            .as_deref()
            .map(|t| {
                TenantId::parse(t).map_err(|e| {
                    Status::unauthenticated(format!(
                        "the token's {:?} claim is not a tenant id: {}",
                        self.0.settings.tenant_claim,
                        gpualloc_auth::truncate(&e, 128)
                    ))
                })
            })
            .transpose()?;
        let caller = Caller {
            subject: identity.subject,
            tenant,
            admin: identity.admin,
            token: Some(Arc::from(token)),
        };
        self.0.verified.put(token, &caller, expires_at, generation);
        Ok(caller)
    }
}

/// Mesh mode: the identity Istio copied from a verified token.
fn from_mesh_headers(headers: &HeaderMap, admin_role: &str) -> Result<Caller, Status> {
    let one = |name: &str| -> Result<Option<String>, Status> {
        let mut values = headers.get_all(name).iter();
        let first = values.next();
        if values.next().is_some() {
            return Err(Status::unauthenticated(format!(
                "{name} appears more than once; identity headers are set by the mesh only"
            )));
        }
        first
            .map(|v| {
                v.to_str()
                    .map(|s| s.trim().to_owned())
                    .map_err(|_| Status::unauthenticated(format!("{name} is not valid text")))
            })
            .transpose()
    };
    let subject = one(SUBJECT_HEADER)?.unwrap_or_default();
    let roles = gpualloc_auth::split_roles(&one(ROLES_HEADER)?.unwrap_or_default());
    let admin = roles.iter().any(|r| r == admin_role);
    let tenant = match one(TENANT_HEADER)? {
        None => None,
        Some(t) if t.is_empty() => None,
        Some(t) => Some(TenantId::parse(t).map_err(|e| {
            Status::unauthenticated(format!(
                "{TENANT_HEADER}: {}",
                gpualloc_auth::truncate(&e, 128)
            ))
        })?),
    };
    if tenant.is_none() && !admin {
        return Err(Status::unauthenticated(format!(
            "no caller identity: the mesh set neither {TENANT_HEADER} nor the {admin_role:?} role \
             in {ROLES_HEADER} (is the request missing its bearer token?)"
        )));
    }
    // Forwarded as is, so that the next hop's sidecar verifies it again.
    let token = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| gpualloc_auth::bearer(Some(v)).ok())
        .map(Arc::from);
    Ok(Caller {
        subject,
        tenant,
        admin,
        token,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[test]
    fn mesh_headers_give_the_caller_and_duplicates_are_refused() {
        let c = from_mesh_headers(
            &headers(&[(TENANT_HEADER, "team-a"), (SUBJECT_HEADER, "alice")]),
            "admin",
        )
        .unwrap();
        assert_eq!(c.tenant.unwrap().as_str(), "team-a");
        assert!(!c.admin);
        let a = from_mesh_headers(&headers(&[(ROLES_HEADER, "viewer,admin")]), "admin").unwrap();
        assert!(a.admin);
        let dup = from_mesh_headers(
            &headers(&[(TENANT_HEADER, "team-a"), (TENANT_HEADER, "team-b")]),
            "admin",
        )
        .unwrap_err();
        assert_eq!(dup.code(), tonic::Code::Unauthenticated);
        assert!(dup.message().contains("more than once"), "{dup:?}");
        let none = from_mesh_headers(&headers(&[]), "admin").unwrap_err();
        assert_eq!(none.code(), tonic::Code::Unauthenticated);
    }
}
