//! Who a caller is, proven by a bearer token. [`verify`] checks a JWT
//! (RS256 or ES256 only) against a [`KeySet`] parsed from a JWKS, with
//! the issuer, audience, expiry and not-before rules of [`Settings`], and
//! turns its claims into an [`Identity`]: subject, tenant and roles. The
//! services call it from their tower stack (gpualloc-platform) for every
//! RPC; nothing below that layer ever sees a token.
//!
//! [`DevIssuer`] is the local development issuer: an ES256 key kept in
//! `cargo xtask up`'s state folder, the JWKS the local services trust, and
//! the tokens `cargo xtask token` prints. Tests mint their tokens with it.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use jsonwebtoken::{
    Algorithm, DecodingKey, EncodingKey, Header, Validation,
    errors::ErrorKind,
    jwk::{AlgorithmParameters, EllipticCurve, Jwk, JwkSet, ThumbprintHash},
};
use serde_json::Value;

/// The issuer of the development tokens (`cargo xtask up`, tests).
pub const DEV_ISSUER: &str = "gpualloc-dev";
/// The audience gpualloc expects unless configured otherwise.
pub const DEFAULT_AUDIENCE: &str = "gpualloc";
/// Default claim names (configurable: identity providers differ).
pub const DEFAULT_TENANT_CLAIM: &str = "tenant";
pub const DEFAULT_ROLES_CLAIM: &str = "roles";
pub const DEFAULT_ADMIN_ROLE: &str = "admin";
/// The most clock skew the services tolerate on `exp` and `nbf`.
pub const MAX_LEEWAY: Duration = Duration::from_secs(60);

/// What a valid token must say, and where its claims are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Settings {
    pub issuer: String,
    pub audience: String,
    /// Claim holding the caller's tenant; a dotted path reaches into
    /// objects (`ext.tenant`).
    pub tenant_claim: String,
    /// Claim holding the roles: an array of strings or one string of
    /// space- or comma-separated roles; dotted paths as above
    /// (`realm_access.roles` for Keycloak).
    pub roles_claim: String,
    /// The role that makes a caller an administrator.
    pub admin_role: String,
    /// Clock skew tolerated on `exp` and `nbf` (at most [`MAX_LEEWAY`]).
    pub leeway: Duration,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            issuer: DEV_ISSUER.into(),
            audience: DEFAULT_AUDIENCE.into(),
            tenant_claim: DEFAULT_TENANT_CLAIM.into(),
            roles_claim: DEFAULT_ROLES_CLAIM.into(),
            admin_role: DEFAULT_ADMIN_ROLE.into(),
            leeway: Duration::from_secs(30),
        }
    }
}

/// A verified caller, as its token describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    /// `sub`.
    pub subject: String,
    /// The tenant claim, if the token has one (administrators may have
    /// none).
    pub tenant: Option<String>,
    pub roles: Vec<String>,
    /// Whether `roles` holds the admin role.
    pub admin: bool,
    /// `exp`: until when the token, once verified, may be trusted.
    pub expires_at: u64,
}

/// Why a token was refused. The messages go to the caller (as
/// `UNAUTHENTICATED`), so they say what is wrong without echoing the token.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("no bearer token: send `authorization: Bearer <JWT>`")]
    Missing,
    #[error("the authorization header is not `Bearer <JWT>`")]
    NotBearer,
    #[error("the token is not a well-formed JWT: {0}")]
    Malformed(String),
    #[error("the token is signed with {0}; only RS256 and ES256 are accepted")]
    Algorithm(String),
    #[error("the token's key {0:?} is not in the trusted key set")]
    UnknownKey(String),
    #[error("the token has no kid and the trusted key set has {0} keys")]
    NoKeyId(usize),
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token is not valid yet (nbf is in the future)")]
    NotYetValid,
    #[error("the token's issuer is not {expected:?}")]
    WrongIssuer { expected: String },
    #[error("the token's audience does not include {expected:?}")]
    WrongAudience { expected: String },
    #[error("the token has no {0:?} claim")]
    MissingClaim(String),
    #[error("the token carries neither a tenant ({tenant_claim:?}) nor the {admin_role:?} role")]
    NoIdentity {
        tenant_claim: String,
        admin_role: String,
    },
    #[error("the token's {claim:?} claim is malformed: {why}")]
    BadClaim { claim: String, why: String },
}

/// Trusted public keys by `kid`, parsed from a JWKS. Keys of other
/// algorithms or curves are left out (and counted), so one set can be
/// shared with systems that use more.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, (DecodingKey, Algorithm)>,
    /// Keys without a `kid`: usable only when the set has one key.
    anonymous: Vec<(DecodingKey, Algorithm)>,
    pub ignored: usize,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.keys.keys().collect::<Vec<_>>())
            .field("anonymous", &self.anonymous.len())
            .field("ignored", &self.ignored)
            .finish()
    }
}

impl KeySet {
    /// Parses a JWKS document (`{"keys": [...]}`).
    pub fn from_jwks(json: &str) -> Result<KeySet, String> {
        let set: JwkSet =
            serde_json::from_str(json).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut out = KeySet::default();
        for jwk in &set.keys {
            let Some(alg) = accepted_algorithm(jwk) else {
                out.ignored += 1;
                continue;
            };
            let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("a JWKS key: {e}"))?;
            match &jwk.common.key_id {
                Some(kid) => {
                    out.keys.insert(kid.clone(), (key, alg));
                }
                None => out.anonymous.push((key, alg)),
            }
        }
        if out.is_empty() {
            return Err(format!(
                "the JWKS has no RS256 or ES256 key ({} other keys)",
                out.ignored
            ));
        }
        Ok(out)
    }

    pub fn len(&self) -> usize {
        self.keys.len() + self.anonymous.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn contains(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    pub fn kids(&self) -> Vec<String> {
        let mut k: Vec<String> = self.keys.keys().cloned().collect();
        k.sort();
        k
    }

    fn find(&self, kid: Option<&str>) -> Result<&(DecodingKey, Algorithm), AuthError> {
        match kid {
            Some(kid) => self
                .keys
                .get(kid)
                .ok_or_else(|| AuthError::UnknownKey(truncate(kid, 64))),
            None if self.len() == 1 => self
                .anonymous
                .first()
                .or_else(|| self.keys.values().next())
                .ok_or(AuthError::NoKeyId(0)),
            None => Err(AuthError::NoKeyId(self.len())),
        }
    }
}

/// RS256 for RSA keys, ES256 for P-256 keys; `None` for anything else
/// (including an RSA key marked for another algorithm).
fn accepted_algorithm(jwk: &Jwk) -> Option<Algorithm> {
    let declared = jwk.common.key_algorithm.map(|a| a.to_string());
    match &jwk.algorithm {
        AlgorithmParameters::RSA(_) if declared.as_deref().is_none_or(|a| a == "RS256") => {
            Some(Algorithm::RS256)
        }
        AlgorithmParameters::EllipticCurve(p)
            if p.curve == EllipticCurve::P256
                && declared.as_deref().is_none_or(|a| a == "ES256") =>
        {
            Some(Algorithm::ES256)
        }
        _ => None,
    }
}

/// The `kid` a token names, if its header parses (to decide whether an
/// unknown key is worth a JWKS refetch).
pub fn key_id(token: &str) -> Option<String> {
    jsonwebtoken::decode_header(token).ok()?.kid
}

/// Takes the token out of an `authorization` header value.
pub fn bearer(header: Option<&str>) -> Result<&str, AuthError> {
    let value = header.ok_or(AuthError::Missing)?.trim();
    let (scheme, token) = value.split_once(' ').ok_or(AuthError::NotBearer)?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::NotBearer);
    }
    Ok(token.trim())
}

/// Verifies `token` against `keys` and `settings` and reads its identity.
pub fn verify(token: &str, keys: &KeySet, settings: &Settings) -> Result<Identity, AuthError> {
    let header =
        jsonwebtoken::decode_header(token).map_err(|e| AuthError::Malformed(e.to_string()))?;
    if !matches!(header.alg, Algorithm::RS256 | Algorithm::ES256) {
        return Err(AuthError::Algorithm(format!("{:?}", header.alg)));
    }
    let (key, key_alg) = keys.find(header.kid.as_deref())?;
    if *key_alg != header.alg {
        // An RSA key must not verify an ES256 header or the reverse.
        return Err(AuthError::BadSignature);
    }
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[settings.issuer.as_str()]);
    validation.set_audience(&[settings.audience.as_str()]);
    validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
    validation.validate_nbf = true;
    validation.leeway = settings.leeway.min(MAX_LEEWAY).as_secs();
    let data = jsonwebtoken::decode::<Value>(token.as_bytes(), key, &validation).map_err(|e| {
        match e.kind() {
            ErrorKind::InvalidSignature => AuthError::BadSignature,
            ErrorKind::ExpiredSignature => AuthError::Expired,
            ErrorKind::ImmatureSignature => AuthError::NotYetValid,
            ErrorKind::InvalidIssuer => AuthError::WrongIssuer {
                expected: settings.issuer.clone(),
            },
            ErrorKind::InvalidAudience => AuthError::WrongAudience {
                expected: settings.audience.clone(),
            },
            ErrorKind::MissingRequiredClaim(c) => AuthError::MissingClaim(c.clone()),
            ErrorKind::InvalidAlgorithm => AuthError::Algorithm(format!("{:?}", header.alg)),
            _ => AuthError::Malformed(e.to_string()),
        }
    })?;
    identity(&data.claims, settings)
}

/// The identity in verified claims.
pub fn identity(claims: &Value, settings: &Settings) -> Result<Identity, AuthError> {
    let subject = match claims.get("sub") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        _ => return Err(AuthError::MissingClaim("sub".into())),
    };
    let tenant = match lookup(claims, &settings.tenant_claim) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(AuthError::BadClaim {
                claim: settings.tenant_claim.clone(),
                why: "must be a string".into(),
            });
        }
    };
    let roles = roles(lookup(claims, &settings.roles_claim), &settings.roles_claim)?;
    let admin = roles.contains(&settings.admin_role);
    if tenant.is_none() && !admin {
        return Err(AuthError::NoIdentity {
            tenant_claim: settings.tenant_claim.clone(),
            admin_role: settings.admin_role.clone(),
        });
    }
    let expires_at = claims.get("exp").and_then(Value::as_u64).unwrap_or(0);
    Ok(Identity {
        subject,
        tenant,
        roles,
        admin,
        expires_at,
    })
}

/// Parses a roles value: an array of strings, or one string of roles
/// separated by spaces or commas (how scopes and proxies flatten lists).
pub fn roles(value: Option<&Value>, claim: &str) -> Result<Vec<String>, AuthError> {
    let bad = |why: &str| AuthError::BadClaim {
        claim: claim.to_owned(),
        why: why.to_owned(),
    };
    match value {
        None | Some(Value::Null) => Ok(Vec::new()),
        Some(Value::String(s)) => Ok(split_roles(s)),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| match v {
                Value::String(s) => Ok(s.clone()),
                _ => Err(bad("must be an array of strings")),
            })
            .collect(),
        Some(_) => Err(bad("must be an array of strings or a string")),
    }
}

/// Roles in one string, separated by spaces or commas.
pub fn split_roles(s: &str) -> Vec<String> {
    s.split([' ', ','])
        .filter(|r| !r.is_empty())
        .map(str::to_owned)
        .collect()
}

fn lookup<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    // A claim whose name itself contains dots wins over the path.
    if let Some(v) = claims.get(path) {
        return Some(v);
    }
    path.split('.').try_fold(claims, |v, part| v.get(part))
}

/// At most `max` characters of `s`, marked when cut (input echoed in
/// errors must stay small).
pub fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        None => s.to_owned(),
        Some((i, _)) => format!("{}…", &s[..i]),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The local development issuer: one ES256 key, its JWKS, and tokens.
pub struct DevIssuer {
    key: EncodingKey,
    pem: String,
    kid: String,
    jwk: Jwk,
    pub issuer: String,
    pub audience: String,
}

impl std::fmt::Debug for DevIssuer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevIssuer")
            .field("kid", &self.kid)
            .field("issuer", &self.issuer)
            .finish()
    }
}

/// File names inside a [`DevIssuer`] folder.
pub const DEV_KEY_FILE: &str = "dev-signing-key.pem";
pub const DEV_JWKS_FILE: &str = "jwks.json";

impl DevIssuer {
    /// A new random key.
    pub fn generate() -> Result<DevIssuer, String> {
        use p256::{
            elliptic_curve::Generate,
            pkcs8::{EncodePrivateKey, LineEnding},
        };
        let secret = p256::SecretKey::generate();
        let pem = secret
            .to_pkcs8_pem(LineEnding::LF)
            .map_err(|e| format!("encoding the key: {e}"))?;
        Self::from_pem(&pem)
    }

    /// The issuer of a PKCS#8 PEM P-256 key; its `kid` is the key's
    /// RFC 7638 thumbprint, so it is stable for the key.
    pub fn from_pem(pem: &str) -> Result<DevIssuer, String> {
        let key = EncodingKey::from_ec_pem(pem.as_bytes())
            .map_err(|e| format!("not a P-256 PKCS#8 PEM key: {e}"))?;
        let mut jwk = Jwk::from_encoding_key(&key, Algorithm::ES256)
            .map_err(|e| format!("deriving the public key: {e}"))?;
        let kid = jwk
            .thumbprint(ThumbprintHash::SHA256)
            .map_err(|e| format!("thumbprint: {e}"))?;
        jwk.common.key_id = Some(kid.clone());
        Ok(DevIssuer {
            key,
            pem: pem.to_owned(),
            kid,
            jwk,
            issuer: DEV_ISSUER.into(),
            audience: DEFAULT_AUDIENCE.into(),
        })
    }

    /// Loads the key kept in `dir`, or creates one there (with its JWKS)
    /// if there is none. The key file is readable by its owner only.
    pub fn load_or_create(dir: &Path) -> Result<DevIssuer, String> {
        let key_path = dir.join(DEV_KEY_FILE);
        let issuer = match std::fs::read_to_string(&key_path) {
            Ok(pem) => Self::from_pem(&pem).map_err(|e| format!("{}: {e}", key_path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
                let issuer = Self::generate()?;
                write_private(&key_path, issuer.pem.as_bytes())
                    .map_err(|e| format!("{}: {e}", key_path.display()))?;
                issuer
            }
            Err(e) => return Err(format!("{}: {e}", key_path.display())),
        };
        let jwks = dir.join(DEV_JWKS_FILE);
        std::fs::write(&jwks, issuer.jwks_json())
            .map_err(|e| format!("{}: {e}", jwks.display()))?;
        Ok(issuer)
    }

    /// Where [`DevIssuer::load_or_create`] keeps the JWKS of `dir`.
    pub fn jwks_path(dir: &Path) -> PathBuf {
        dir.join(DEV_JWKS_FILE)
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The JWKS with this issuer's public key.
    pub fn jwks_json(&self) -> String {
        let set = JwkSet {
            keys: vec![self.jwk.clone()],
        };
        serde_json::to_string_pretty(&set).unwrap_or_default()
    }

    /// The public key as one JWK (to combine several issuers in one JWKS).
    pub fn jwk(&self) -> &Jwk {
        &self.jwk
    }

    /// A token for a tenant (`roles` empty) or an administrator
    /// (`roles = ["admin"]`), valid for `ttl`.
    pub fn token(
        &self,
        subject: &str,
        tenant: Option<&str>,
        roles: &[&str],
        ttl: Duration,
    ) -> Result<String, String> {
        let now = unix_now();
        let mut claims = serde_json::json!({
            "iss": self.issuer,
            "aud": self.audience,
            "sub": subject,
            "iat": now,
            "nbf": now,
            "exp": now + ttl.as_secs().max(1),
            DEFAULT_ROLES_CLAIM: roles,
        });
        if let Some(t) = tenant {
            claims[DEFAULT_TENANT_CLAIM] = Value::String(t.to_owned());
        }
        self.sign(&claims)
    }

    /// Signs arbitrary claims with this key (tests forge expired,
    /// foreign-audience or identity-less tokens with it).
    pub fn sign(&self, claims: &Value) -> Result<String, String> {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).map_err(|e| format!("signing: {e}"))
    }

    /// Signs with a header of the caller's making (a wrong `kid`, none).
    pub fn sign_with_header(&self, header: &Header, claims: &Value) -> Result<String, String> {
        jsonwebtoken::encode(header, claims, &self.key).map_err(|e| format!("signing: {e}"))
    }
}

/// Seconds since the Unix epoch (for claims built by hand).
pub fn now_unix() -> u64 {
    unix_now()
}

fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path)?.write_all(bytes)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn settings() -> Settings {
        Settings::default()
    }

    fn keys(issuer: &DevIssuer) -> KeySet {
        KeySet::from_jwks(&issuer.jwks_json()).unwrap()
    }

    #[test]
    fn a_tenant_token_verifies() {
        let i = DevIssuer::generate().unwrap();
        let t = i
            .token("alice", Some("team-a"), &[], Duration::from_secs(60))
            .unwrap();
        let id = verify(&t, &keys(&i), &settings()).unwrap();
        assert_eq!(id.subject, "alice");
        assert_eq!(id.tenant.as_deref(), Some("team-a"));
        assert!(!id.admin);
        let a = i
            .token("root", None, &["admin"], Duration::from_secs(60))
            .unwrap();
        assert!(verify(&a, &keys(&i), &settings()).unwrap().admin);
    }

    #[test]
    fn each_refusal_says_why() {
        let i = DevIssuer::generate().unwrap();
        let other = DevIssuer::generate().unwrap();
        let now = now_unix();
        let claims = |f: &dyn Fn(&mut Value)| {
            let mut c = serde_json::json!({"iss": DEV_ISSUER, "aud": DEFAULT_AUDIENCE,
                "sub": "s", "exp": now + 600, "tenant": "t"});
            f(&mut c);
            c
        };
        let k = keys(&i);
        let s = settings();
        let check = |token: String, want: AuthError| {
            assert_eq!(verify(&token, &k, &s).unwrap_err(), want);
        };
        check(
            i.sign(&claims(&|c| c["exp"] = (now - 3600).into()))
                .unwrap(),
            AuthError::Expired,
        );
        check(
            i.sign(&claims(&|c| c["nbf"] = (now + 3600).into()))
                .unwrap(),
            AuthError::NotYetValid,
        );
        check(
            i.sign(&claims(&|c| c["iss"] = "evil".into())).unwrap(),
            AuthError::WrongIssuer {
                expected: DEV_ISSUER.into(),
            },
        );
        check(
            i.sign(&claims(&|c| c["aud"] = "other".into())).unwrap(),
            AuthError::WrongAudience {
                expected: DEFAULT_AUDIENCE.into(),
            },
        );
        check(
            i.sign(&claims(&|c| {
                c.as_object_mut().unwrap().remove("tenant");
            }))
            .unwrap(),
            AuthError::NoIdentity {
                tenant_claim: "tenant".into(),
                admin_role: "admin".into(),
            },
        );
        // Another key under the same kid: the signature fails.
        let mut h = Header::new(Algorithm::ES256);
        h.kid = Some(i.kid().to_owned());
        check(
            other.sign_with_header(&h, &claims(&|_| {})).unwrap(),
            AuthError::BadSignature,
        );
        check(
            other.sign(&claims(&|_| {})).unwrap(),
            AuthError::UnknownKey(other.kid().to_owned()),
        );
        assert!(matches!(
            verify("not-a-jwt", &k, &s),
            Err(AuthError::Malformed(_))
        ));
    }

    #[test]
    fn symmetric_and_unsigned_tokens_are_refused() {
        let i = DevIssuer::generate().unwrap();
        let claims = serde_json::json!({"iss": DEV_ISSUER, "aud": DEFAULT_AUDIENCE,
            "sub": "s", "exp": now_unix() + 600, "roles": ["admin"]});
        let hs = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(b"guessable").unwrap(),
        )
        .unwrap();
        assert!(matches!(
            verify(&hs, &keys(&i), &settings()),
            Err(AuthError::Algorithm(_))
        ));
        // alg "none": header {"alg":"none"}, no signature.
        let none = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJzIn0.";
        assert!(verify(none, &keys(&i), &settings()).is_err());
    }

    #[test]
    fn roles_come_as_arrays_strings_or_nested_claims() {
        let s = Settings {
            roles_claim: "realm_access.roles".into(),
            ..settings()
        };
        let c = serde_json::json!({"sub": "x", "realm_access": {"roles": ["viewer", "admin"]}});
        assert!(identity(&c, &s).unwrap().admin);
        let c = serde_json::json!({"sub": "x", "tenant": "t", "roles": "read, admin"});
        assert_eq!(
            identity(&c, &settings()).unwrap().roles,
            vec!["read".to_owned(), "admin".to_owned()]
        );
        let c = serde_json::json!({"sub": "x", "tenant": 7});
        assert!(matches!(
            identity(&c, &settings()),
            Err(AuthError::BadClaim { .. })
        ));
    }

    #[test]
    fn bearer_headers_parse() {
        assert_eq!(bearer(Some("Bearer abc")), Ok("abc"));
        assert_eq!(bearer(Some("bearer  abc ")), Ok("abc"));
        assert_eq!(bearer(None), Err(AuthError::Missing));
        assert_eq!(bearer(Some("Basic abc")), Err(AuthError::NotBearer));
        assert_eq!(bearer(Some("Bearer ")), Err(AuthError::NotBearer));
    }

    #[test]
    fn the_dev_key_survives_a_restart() {
        let dir = tempdir();
        let a = DevIssuer::load_or_create(&dir).unwrap();
        let b = DevIssuer::load_or_create(&dir).unwrap();
        assert_eq!(a.kid(), b.kid());
        let t = a
            .token("s", Some("t"), &[], Duration::from_secs(60))
            .unwrap();
        let jwks = std::fs::read_to_string(DevIssuer::jwks_path(&dir)).unwrap();
        verify(&t, &KeySet::from_jwks(&jwks).unwrap(), &settings()).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(dir.join(DEV_KEY_FILE))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o077, 0, "the key is private");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempdir() -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "gpualloc-auth-{}-{}",
            std::process::id(),
            unix_now()
        ));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn truncation_marks_the_cut() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abcdef", 3), "abc…");
        assert_eq!(truncate("ééééé", 2), "éé…");
    }
}
