//! `cargo xtask token` prints a token and nothing else, signed by the key
//! that `cargo xtask up` keeps in the state folder (created on first use,
//! the same on every later call), with the claims asked for.

use std::{path::Path, process::Command};

use gpualloc_auth::{DevIssuer, KeySet, Settings, verify};

fn token(state: &Path, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .arg("token")
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .expect("running xtask");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).expect("utf-8");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 1, "more than the token on stdout: {stdout:?}");
    lines[0].to_owned()
}

#[test]
fn tokens_verify_against_the_state_folders_keys() {
    let dir = std::env::temp_dir().join(format!("xtask-token-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let tenant = token(&dir, &["--tenant", "demo"]);
    let admin = token(&dir, &["--admin", "--ttl", "5m"]);
    let jwks = std::fs::read_to_string(DevIssuer::jwks_path(&dir.join("auth"))).expect("a JWKS");
    let keys = KeySet::from_jwks(&jwks).expect("a key set");
    let t = verify(&tenant, &keys, &Settings::default()).expect("the tenant token verifies");
    assert_eq!(t.tenant.as_deref(), Some("demo"));
    assert!(!t.admin);
    let a = verify(&admin, &keys, &Settings::default()).expect("the admin token verifies");
    assert!(a.admin);
    // The key is kept: a later token verifies against the same JWKS.
    let again = token(&dir, &["--tenant", "other"]);
    verify(&again, &keys, &Settings::default()).expect("the key was kept");
    // Neither or both of --tenant and --admin is a usage error.
    let both = Command::new(env!("CARGO_BIN_EXE_xtask"))
        .args(["token", "--tenant", "x", "--admin", "--state-dir"])
        .arg(&dir)
        .output()
        .expect("running xtask");
    assert!(!both.status.success());
    assert!(both.stdout.is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}
