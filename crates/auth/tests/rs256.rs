//! RS256 tokens verify against an RSA key in the JWKS, as ES256 ones do;
//! other RSA algorithms are refused, and an RSA key cannot verify an
//! ES256 header. The key is a throwaway made for this test with
//! `openssl genpkey -algorithm RSA` (RSA key generation is too slow in
//! a debug build to do here).

#![allow(clippy::unwrap_used)]

use gpualloc_auth::{AuthError, DEFAULT_AUDIENCE, DEV_ISSUER, KeySet, Settings, now_unix, verify};
use jsonwebtoken::{Algorithm, EncodingKey, Header, jwk::Jwk};

const KEY: &str = include_str!("rsa-test-key.pem");

fn claims() -> serde_json::Value {
    serde_json::json!({
        "iss": DEV_ISSUER, "aud": DEFAULT_AUDIENCE, "sub": "svc",
        "exp": now_unix() + 600, "roles": ["admin"],
    })
}

#[test]
fn rs256_verifies_and_other_rsa_algorithms_do_not() {
    let key = EncodingKey::from_rsa_pem(KEY.as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some("rsa-1".into());
    let jwks = serde_json::json!({ "keys": [jwk] }).to_string();
    let keys = KeySet::from_jwks(&jwks).unwrap();

    let mut header = Header::new(Algorithm::RS256);
    header.kid = Some("rsa-1".into());
    let token = jsonwebtoken::encode(&header, &claims(), &key).unwrap();
    let id = verify(&token, &keys, &Settings::default()).unwrap();
    assert!(id.admin);
    assert_eq!(id.subject, "svc");

    let mut rs512 = Header::new(Algorithm::RS512);
    rs512.kid = Some("rsa-1".into());
    let token = jsonwebtoken::encode(&rs512, &claims(), &key).unwrap();
    assert!(matches!(
        verify(&token, &keys, &Settings::default()),
        Err(AuthError::Algorithm(_))
    ));
}

#[test]
fn an_rsa_key_does_not_verify_an_es256_header() {
    let key = EncodingKey::from_rsa_pem(KEY.as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&key, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some("shared".into());
    let keys = KeySet::from_jwks(&serde_json::json!({ "keys": [jwk] }).to_string()).unwrap();
    let es = gpualloc_auth::DevIssuer::generate().unwrap();
    let mut header = Header::new(Algorithm::ES256);
    header.kid = Some("shared".into());
    let token = es.sign_with_header(&header, &claims()).unwrap();
    assert_eq!(
        verify(&token, &keys, &Settings::default()),
        Err(AuthError::BadSignature)
    );
}
