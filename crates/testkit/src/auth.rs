//! Tokens for tests: one development issuer per test process, whose JWKS
//! file every service under test trusts (`GPUALLOC_JWKS`).

use std::{path::PathBuf, sync::OnceLock, time::Duration};

use gpualloc_auth::DevIssuer;

struct Keys {
    issuer: DevIssuer,
    dir: tempfile::TempDir,
}

fn keys() -> &'static Keys {
    static KEYS: OnceLock<Keys> = OnceLock::new();
    KEYS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let issuer = DevIssuer::load_or_create(dir.path()).unwrap();
        Keys { issuer, dir }
    })
}

/// The issuer whose tokens the services under test accept.
pub fn issuer() -> &'static DevIssuer {
    &keys().issuer
}

/// The JWKS file to configure services with.
pub fn jwks_path() -> PathBuf {
    DevIssuer::jwks_path(keys().dir.path())
}

/// A bearer token of `tenant`, valid for an hour.
pub fn tenant_token(tenant: &str) -> String {
    issuer()
        .token(
            &format!("user@{tenant}"),
            Some(tenant),
            &[],
            Duration::from_secs(3600),
        )
        .unwrap()
}

/// A bearer token of an administrator, valid for an hour.
pub fn admin_token() -> String {
    issuer()
        .token("root", None, &["admin"], Duration::from_secs(3600))
        .unwrap()
}
