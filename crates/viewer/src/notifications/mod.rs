//! Notifications: tell tenants when one of their allocations changes.
//!
//! The projection decides *what* to tell, inside its own transaction: for
//! each state change worth a message it stores one delivery row per
//! matching channel, keyed by (event id, channel) so a redelivered or
//! replayed event never creates a second one. The [`delivery`] task then
//! does the slow part — HTTP calls to webhooks, Slack or KakaoTalk — on
//! its own schedule, retrying with exponential backoff and jitter and
//! parking what keeps failing, so a dead receiver never holds up the
//! projection.
//!
//! Nothing else in the viewer depends on what is in here but the
//! projection's call to [`enqueue`] and the service's start of
//! [`delivery::run`].

pub mod delivery;

use std::{collections::BTreeSet, path::Path, time::Duration};

use diesel::prelude::*;
use gpualloc_domain::State;
use gpualloc_domain::time;
use gpualloc_proto::events::v1 as ev;
use gpualloc_storage::{DbConnection, Native};
use serde::{Deserialize, Serialize};

use crate::{Error, schema::notifications};

/// Where KakaoTalk's API lives unless a channel says otherwise.
pub const KAKAO_API: &str = "https://kapi.kakao.com";

/// The notification settings, from the JSON file named by
/// `GPUALLOC_NOTIFY_CONFIG` (see docs/notifications.md).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    #[serde(default)]
    pub channels: Vec<Channel>,
    /// Warn this long before a lease ends (0 turns the warning off).
    #[serde(default = "defaults::lease_warning_seconds")]
    pub lease_warning_seconds: u64,
    /// Attempts before a delivery is parked.
    #[serde(default = "defaults::max_attempts")]
    pub max_attempts: u32,
    /// First retry delay; it doubles per attempt up to `retry_max_ms`.
    #[serde(default = "defaults::retry_base_ms")]
    pub retry_base_ms: u64,
    #[serde(default = "defaults::retry_max_ms")]
    pub retry_max_ms: u64,
    /// Per HTTP request.
    #[serde(default = "defaults::timeout_ms")]
    pub timeout_ms: u64,
    /// Delivered rows are deleted after this many days (parked ones stay
    /// until an operator requeues them).
    #[serde(default = "defaults::retention_days")]
    pub retention_days: u64,
}

mod defaults {
    pub fn lease_warning_seconds() -> u64 {
        900
    }
    pub fn max_attempts() -> u32 {
        12
    }
    pub fn retry_base_ms() -> u64 {
        1_000
    }
    pub fn retry_max_ms() -> u64 {
        300_000
    }
    pub fn timeout_ms() -> u64 {
        10_000
    }
    pub fn retention_days() -> u64 {
        30
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            channels: Vec::new(),
            lease_warning_seconds: defaults::lease_warning_seconds(),
            max_attempts: defaults::max_attempts(),
            retry_base_ms: defaults::retry_base_ms(),
            retry_max_ms: defaults::retry_max_ms(),
            timeout_ms: defaults::timeout_ms(),
            retention_days: defaults::retention_days(),
        }
    }
}

/// One place notifications go.
#[derive(Clone, Debug, Deserialize, PartialEq)]
pub struct Channel {
    /// Unique; deliveries are stored under it.
    pub name: String,
    /// Only this tenant's allocations; every tenant's when absent.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Only these kinds (e.g. `["ALLOCATED", "LEASE_EXPIRING"]`); all when
    /// empty.
    #[serde(default)]
    pub kinds: BTreeSet<Kind>,
    #[serde(flatten)]
    pub target: Target,
}

/// How a channel is reached.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Target {
    /// HTTP POST of the notification as JSON; signed when `secret` is set.
    Webhook {
        url: String,
        #[serde(default)]
        secret: Option<Secret>,
    },
    /// A Slack-compatible incoming webhook (`{"text": …}`). The URL is a
    /// credential: give it as `{"env": "NAME"}` to keep it out of the file.
    Slack { url: Secret },
    /// KakaoTalk's "send to me" memo API.
    Kakao {
        #[serde(default = "kakao_api")]
        base_url: String,
        token: Secret,
        /// Where the message's link points (e.g. your console).
        #[serde(default)]
        link_url: Option<String>,
    },
}

fn kakao_api() -> String {
    KAKAO_API.to_owned()
}

/// Reads an environment variable (a parameter, so tests need not change
/// the process's environment).
pub type Lookup<'a> = dyn Fn(&str) -> Option<String> + 'a;

/// A secret given inline or, as `{"env": "NAME"}`, read from the
/// environment when the settings are loaded (keeps it out of the file).
#[derive(Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum Secret {
    Inline(String),
    Env { env: String },
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Secret::Inline(_) => f.write_str("Secret(<inline>)"),
            Secret::Env { env } => write!(f, "Secret(env {env})"),
        }
    }
}

impl Secret {
    pub fn value(&self) -> &str {
        match self {
            Secret::Inline(s) => s,
            // Resolved by `Settings::load`.
            Secret::Env { .. } => "",
        }
    }

    fn resolve(&mut self, channel: &str, lookup: &Lookup<'_>) -> anyhow::Result<()> {
        if let Secret::Env { env } = self {
            let value = lookup(env.as_str()).ok_or_else(|| {
                anyhow::anyhow!("channel {channel:?}: environment variable {env} is not set")
            })?;
            *self = Secret::Inline(value);
        }
        Ok(())
    }
}

/// What a notification is about.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Kind {
    Allocated,
    Held,
    Rejected,
    Cancelled,
    Expired,
    LeaseExpiring,
    LeaseRenewed,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Allocated => "ALLOCATED",
            Kind::Held => "HELD",
            Kind::Rejected => "REJECTED",
            Kind::Cancelled => "CANCELLED",
            Kind::Expired => "EXPIRED",
            Kind::LeaseExpiring => "LEASE_EXPIRING",
            Kind::LeaseRenewed => "LEASE_RENEWED",
        }
    }

    /// The kind a change into `state` is announced as, if any.
    pub fn of_state(state: State) -> Option<Kind> {
        match state {
            State::Allocated => Some(Kind::Allocated),
            State::Rejected => Some(Kind::Rejected),
            State::Cancelled => Some(Kind::Cancelled),
            State::Expired => Some(Kind::Expired),
            // HELD is announced from the pool's ReservationHeld, which
            // carries the queue position.
            _ => None,
        }
    }
}

/// A notification, independent of the channel. The webhook body is this
/// JSON; Slack and KakaoTalk get `text`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Notification {
    /// Stable across retries: receivers can deduplicate on it.
    pub id: String,
    pub kind: Kind,
    pub tenant: String,
    pub allocation_id: String,
    pub state: String,
    /// The allocation version this is about.
    pub version: i64,
    pub reason: String,
    #[serde(skip_serializing_if = "String::is_empty", default)]
    pub pool: String,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub hold_position: Option<i64>,
    /// RFC 3339, when the lease ends.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub expire_time: Option<String>,
    /// RFC 3339, when it happened.
    pub time: String,
    /// One line for people.
    pub text: String,
}

/// Whether an `http://` URL points at this machine.
fn is_loopback(url: &str) -> bool {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let host = rest.split(['/', '?']).next().unwrap_or("");
    let host = host.rsplit_once('@').map_or(host, |(_, h)| h);
    let host = if host.starts_with('[') {
        host.split(']').next().map(|h| h.trim_start_matches('['))
    } else {
        host.split(':').next()
    }
    .unwrap_or("");
    host == "localhost"
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

impl Settings {
    pub fn load(path: &Path) -> anyhow::Result<Settings> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!("reading the notification settings {}: {e}", path.display())
        })?;
        Self::parse(&text)
            .map_err(|e| anyhow::anyhow!("notification settings {}: {e:#}", path.display()))
    }

    pub fn parse(text: &str) -> anyhow::Result<Settings> {
        Self::parse_with_env(text, &|name| std::env::var(name).ok())
    }

    /// [`Settings::parse`], reading `{"env": …}` secrets with `lookup`.
    pub fn parse_with_env(text: &str, lookup: &Lookup<'_>) -> anyhow::Result<Settings> {
        let mut s: Settings = serde_json::from_str(text)?;
        let mut names = BTreeSet::new();
        for c in &mut s.channels {
            if c.name.trim().is_empty() {
                anyhow::bail!("a channel has no name");
            }
            if !names.insert(c.name.clone()) {
                anyhow::bail!("two channels are named {:?}", c.name);
            }
            let url = match &mut c.target {
                Target::Webhook { url, secret } => {
                    if let Some(secret) = secret {
                        secret.resolve(&c.name, lookup)?;
                        if secret.value().is_empty() {
                            // An empty key signs nothing anyone could not
                            // forge: refuse rather than pretend.
                            anyhow::bail!(
                                "channel {:?}: the webhook's HMAC secret is empty",
                                c.name
                            );
                        }
                    }
                    url.clone()
                }
                Target::Slack { url } => {
                    url.resolve(&c.name, lookup)?;
                    url.value().to_owned()
                }
                Target::Kakao {
                    base_url, token, ..
                } => {
                    token.resolve(&c.name, lookup)?;
                    if token.value().is_empty() {
                        anyhow::bail!("channel {:?}: the KakaoTalk token is empty", c.name);
                    }
                    // The bearer token must not travel in clear text,
                    // except to a local stand-in (tests, a proxy).
                    if base_url.starts_with("http://") && !is_loopback(base_url) {
                        anyhow::bail!(
                            "channel {:?}: the KakaoTalk base URL must be https:// (plain http only on loopback)",
                            c.name
                        );
                    }
                    base_url.clone()
                }
            };
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                // The URL may be a credential: not repeated.
                anyhow::bail!("channel {:?}: the URL is not an http(s) URL", c.name);
            }
        }
        if s.max_attempts == 0 || s.retry_base_ms == 0 || s.timeout_ms == 0 {
            anyhow::bail!("max_attempts, retry_base_ms and timeout_ms must be positive");
        }
        s.retry_max_ms = s.retry_max_ms.max(s.retry_base_ms);
        Ok(s)
    }

    pub fn lease_warning(&self) -> Option<Duration> {
        (self.lease_warning_seconds > 0).then(|| Duration::from_secs(self.lease_warning_seconds))
    }

    /// The channels `kind` for `tenant` goes to.
    pub fn channels_for<'a>(
        &'a self,
        tenant: &'a str,
        kind: Kind,
    ) -> impl Iterator<Item = &'a Channel> + 'a {
        self.channels.iter().filter(move |c| {
            c.tenant.as_deref().is_none_or(|t| t == tenant)
                && (c.kinds.is_empty() || c.kinds.contains(&kind))
        })
    }

    pub fn channel(&self, name: &str) -> Option<&Channel> {
        self.channels.iter().find(|c| c.name == name)
    }
}

/// The notification for a change of `a` into a state worth announcing.
pub fn of_change(event_id: &str, kind: Kind, a: &ev::AllocationSnapshot, now: i64) -> Notification {
    let when = a
        .update_time
        .as_ref()
        .map(time::from_timestamp)
        .unwrap_or(now);
    let expire = a.expire_time.as_ref().map(time::from_timestamp);
    let what = resources_text(a.resources.as_ref());
    let text = match kind {
        Kind::Allocated => {
            let until = expire
                .map(|e| format!(" until {}", rfc3339(e)))
                .unwrap_or_default();
            format!(
                "[gpualloc] {}: allocation {} is ALLOCATED on pool {} ({what}){until}",
                a.tenant, a.allocation_id, a.pool
            )
        }
        Kind::Expired => format!(
            "[gpualloc] {}: allocation {} EXPIRED ({what}): {}",
            a.tenant, a.allocation_id, a.reason
        ),
        Kind::LeaseRenewed => format!(
            "[gpualloc] {}: the lease of allocation {} on pool {} ({what}) was renewed: it ends at {}",
            a.tenant,
            a.allocation_id,
            a.pool,
            expire.map(rfc3339).unwrap_or_default()
        ),
        _ => format!(
            "[gpualloc] {}: allocation {} was {} ({what}): {}",
            a.tenant,
            a.allocation_id,
            kind.as_str(),
            a.reason
        ),
    };
    Notification {
        id: event_id.to_owned(),
        kind,
        tenant: a.tenant.clone(),
        allocation_id: a.allocation_id.clone(),
        state: match kind {
            Kind::LeaseRenewed => "ALLOCATED".to_owned(),
            _ => kind.as_str().to_owned(),
        },
        version: a.version,
        reason: a.reason.clone(),
        pool: a.pool.clone(),
        hold_position: None,
        expire_time: expire.map(rfc3339),
        time: rfc3339(when),
        text,
    }
}

/// The notification that a request waits in the hold queue.
pub fn of_hold(
    event_id: &str,
    tenant: &str,
    allocation_id: &str,
    version: i64,
    position: i64,
    reason: &str,
    when: i64,
) -> Notification {
    Notification {
        id: event_id.to_owned(),
        kind: Kind::Held,
        tenant: tenant.to_owned(),
        allocation_id: allocation_id.to_owned(),
        state: Kind::Held.as_str().to_owned(),
        version,
        reason: reason.to_owned(),
        pool: String::new(),
        hold_position: Some(position),
        expire_time: None,
        time: rfc3339(when),
        text: format!(
            "[gpualloc] {tenant}: allocation {allocation_id} is HELD at position {position} in the hold queue"
        ),
    }
}

/// The warning that `a`'s lease ends soon.
pub fn of_lease(a: &ev::AllocationSnapshot, expire: i64, now: i64) -> Notification {
    let minutes = ((expire - now).max(0) + 59_999_999) / 60_000_000;
    Notification {
        id: lease_key(&a.allocation_id, expire),
        kind: Kind::LeaseExpiring,
        tenant: a.tenant.clone(),
        allocation_id: a.allocation_id.clone(),
        state: "ALLOCATED".to_owned(),
        version: a.version,
        reason: format!("the lease ends in {minutes} min"),
        pool: a.pool.clone(),
        hold_position: None,
        expire_time: Some(rfc3339(expire)),
        time: rfc3339(now),
        text: format!(
            "[gpualloc] {}: the lease of allocation {} ({}) ends at {} (in {minutes} min)",
            a.tenant,
            a.allocation_id,
            resources_text(a.resources.as_ref()),
            rfc3339(expire)
        ),
    }
}

/// Dedupe key of a lease warning: a renewed lease gets a new warning.
pub fn lease_key(allocation_id: &str, expire: i64) -> String {
    format!("lease:{allocation_id}:{expire}")
}

fn resources_text(r: Option<&ev::Resources>) -> String {
    let Some(r) = r else {
        return "no resources".into();
    };
    let mut parts = Vec::new();
    if r.gpus > 0 {
        let model = if r.gpu_model.is_empty() {
            "GPU"
        } else {
            &r.gpu_model
        };
        parts.push(format!("{}× {model}", r.gpus));
    }
    if r.cpu_millis > 0 {
        parts.push(format!("{} CPU", r.cpu_millis as f64 / 1000.0));
    }
    if r.memory_mib > 0 {
        parts.push(format!("{} GiB memory", r.memory_mib as f64 / 1024.0));
    }
    if r.storage_gib > 0 {
        parts.push(format!("{} GiB storage", r.storage_gib));
    }
    for (class, n) in &r.custom {
        parts.push(format!("{n} {class}"));
    }
    if parts.is_empty() {
        "no resources".into()
    } else {
        parts.join(", ")
    }
}

pub use gpualloc_domain::time::{civil_from_days, rfc3339};

/// Stores `n` for every channel it goes to, once per (id, channel). Runs
/// inside the caller's transaction.
pub fn enqueue(
    conn: &mut DbConnection,
    settings: &Settings,
    n: &Notification,
    now: i64,
) -> Result<usize, Error> {
    let body = serde_json::to_string(n).map_err(|e| Error::BadEvent(e.to_string()))?;
    let mut stored = 0;
    for channel in settings.channels_for(&n.tenant, n.kind) {
        let exists: i64 = notifications::table
            .filter(notifications::dedupe_key.eq(&n.id))
            .filter(notifications::channel.eq(&channel.name))
            .count()
            .get_result_native(conn)?;
        if exists > 0 {
            continue;
        }
        // A concurrent insert of the same key by another replica fails on
        // the unique constraint; the transaction is retried and then
        // takes the branch above.
        diesel::insert_into(notifications::table)
            .values((
                notifications::dedupe_key.eq(&n.id),
                notifications::channel.eq(&channel.name),
                notifications::tenant.eq(&n.tenant),
                notifications::allocation_id.eq(&n.allocation_id),
                notifications::kind.eq(n.kind.as_str()),
                notifications::body.eq(&body),
                notifications::status.eq(status::PENDING),
                notifications::attempts.eq(0),
                notifications::next_attempt.eq(now),
                notifications::last_error.eq(""),
                notifications::create_time.eq(now),
            ))
            .execute_native(conn)?;
        stored += 1;
    }
    Ok(stored)
}

/// Delivery states.
pub mod status {
    pub const PENDING: &str = "PENDING";
    pub const DELIVERED: &str = "DELIVERED";
    pub const PARKED: &str = "PARKED";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_resolve_secrets_and_reject_mistakes() {
        let s = Settings::parse(
            r#"{"channels": [
                {"name": "hook", "type": "webhook", "url": "http://x/h", "secret": "s3"},
                {"name": "ops", "type": "slack", "url": "https://hooks.example/T", "tenant": "a",
                 "kinds": ["ALLOCATED"]},
                {"name": "me", "type": "kakao", "token": "tok"}
            ]}"#,
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(s.channels.len(), 3);
        assert_eq!(
            s.channels[2].target,
            Target::Kakao {
                base_url: KAKAO_API.into(),
                token: Secret::Inline("tok".into()),
                link_url: None
            }
        );
        let names = |t, k| {
            s.channels_for(t, k)
                .map(|c| c.name.as_str())
                .collect::<Vec<_>>()
        };
        assert_eq!(names("a", Kind::Allocated), ["hook", "ops", "me"]);
        assert_eq!(names("a", Kind::Cancelled), ["hook", "me"]);
        assert_eq!(names("b", Kind::Allocated), ["hook", "me"]);

        for bad in [
            r#"{"channels": [{"name": "x", "type": "slack", "url": "ftp://x"}]}"#,
            r#"{"channels": [{"name": "x", "type": "slack", "url": "http://x"},
                             {"name": "x", "type": "slack", "url": "http://y"}]}"#,
            r#"{"channels": [{"name": "x", "type": "kakao",
                              "token": {"env": "GPUALLOC_TEST_UNSET_VARIABLE_0xdead"}}]}"#,
            r#"{"channels": [{"name": "x", "type": "pager", "url": "http://x"}]}"#,
            r#"{"max_attempts": 0}"#,
            r#"{"chanels": []}"#,
            // An empty HMAC key signs nothing.
            r#"{"channels": [{"name": "x", "type": "webhook", "url": "http://x", "secret": ""}]}"#,
            // A bearer token in clear text to another host.
            r#"{"channels": [{"name": "x", "type": "kakao", "token": "t",
                              "base_url": "http://kapi.example"}]}"#,
        ] {
            assert!(Settings::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn slack_urls_come_from_the_environment_and_loopback_kakao_is_allowed() {
        let env =
            |name: &str| (name == "SLACK_URL").then(|| "https://hooks.example/T123".to_owned());
        let s = Settings::parse_with_env(
            r#"{"channels": [
                {"name": "ops", "type": "slack", "url": {"env": "SLACK_URL"}},
                {"name": "me", "type": "kakao", "token": "t", "base_url": "http://127.0.0.1:9/"}
            ]}"#,
            &env,
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        assert_eq!(
            s.channels[0].target,
            Target::Slack {
                url: Secret::Inline("https://hooks.example/T123".into())
            }
        );
        assert!(is_loopback("http://localhost:8080/x"));
        assert!(is_loopback("http://[::1]:8080"));
        assert!(!is_loopback("http://127.0.0.1.evil.example/"));
        assert!(!is_loopback("http://kapi.kakao.com"));
        let e = Settings::parse(
            r#"{"channels": [{"name": "x", "type": "slack", "url": "hooks.example/secret"}]}"#,
        )
        .unwrap_err();
        assert!(
            !format!("{e:#}").contains("secret"),
            "the URL was echoed: {e:#}"
        );
    }
}
