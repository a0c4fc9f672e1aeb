//! The NATS side of the saga: connecting (several members, credentials and
//! TLS, jittered reconnects, fast detection of a silent member), the
//! JetStream context with its ack deadline, and provisioning the stream.

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use async_nats::{
    ConnectOptions,
    connection::State,
    jetstream::{self, stream},
};
use gpualloc_domain::Backoff;

/// How a service proves who it is to NATS, and the TLS it uses. The
/// server refuses anonymous clients, and each service's user may publish
/// only its own events (see `gpualloc-nats-acl`).
#[derive(Clone, Default, PartialEq, Eq)]
pub struct NatsAuth {
    /// The user; also named in the URL as `nats://user:password@host`.
    pub user: Option<String>,
    pub password: Option<String>,
    /// A file holding an nkey seed (`SU…`), instead of a password.
    pub nkey_seed_file: Option<std::path::PathBuf>,
    /// A `.creds` file (user JWT and nkey seed, operator mode).
    pub creds_file: Option<std::path::PathBuf>,
    /// CA certificates to trust for the server's certificate (PEM).
    pub tls_ca: Option<std::path::PathBuf>,
    /// A client certificate and key (PEM), for servers that verify them.
    pub tls_cert: Option<std::path::PathBuf>,
    pub tls_key: Option<std::path::PathBuf>,
    /// Refuse to talk to the server without TLS.
    pub tls_required: bool,
}

impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print a password or a seed.
        f.debug_struct("NatsAuth")
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("creds_file", &self.creds_file)
            .field("tls_ca", &self.tls_ca)
            .field("tls_cert", &self.tls_cert)
            .field("tls_required", &self.tls_required)
            .finish()
    }
}

/// Where the saga's events live.
#[derive(Clone)]
pub struct BusConfig {
    /// NATS server URL(s), comma-separated. May carry `user:password@`;
    /// logs and errors show it redacted.
    pub url: String,
    /// Credentials and TLS.
    pub auth: NatsAuth,
    /// JetStream stream holding every event.
    pub stream: String,
    /// Subject prefix; the stream holds `<prefix>.>`.
    pub prefix: String,
    /// Stream replicas (3 on a NATS cluster in production).
    pub stream_replicas: usize,
    /// How long events are kept; zero keeps them forever (the viewer's
    /// rebuild replays the whole stream).
    pub max_age: Duration,
    /// Window in which JetStream drops a second publish of the same
    /// `Nats-Msg-Id`; beyond it consumers' inboxes catch duplicates.
    pub duplicate_window: Duration,
}

impl BusConfig {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            stream: "GPUALLOC".into(),
            prefix: "gpualloc".into(),
            stream_replicas: 1,
            max_age: Duration::ZERO,
            duplicate_window: Duration::from_secs(120),
            auth: NatsAuth::default(),
        }
    }
}

impl std::fmt::Debug for BusConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BusConfig")
            .field("url", &gpualloc_storage::redact_url(&self.url))
            .field("auth", &self.auth)
            .field("stream", &self.stream)
            .field("prefix", &self.prefix)
            .field("stream_replicas", &self.stream_replicas)
            .finish()
    }
}

/// Takes `user:password@` (or a bare `token@`) out of the URLs: the client
/// library does not read credentials from URLs, and URLs end up in logs.
pub fn split_url_credentials(url: &str) -> (String, Option<(String, Option<String>)>) {
    let mut found = None;
    let urls: Vec<String> = url
        .split(',')
        .map(|u| {
            let u = u.trim();
            match (u.find("://"), u.rfind('@')) {
                (Some(scheme), Some(at)) if at > scheme => {
                    let userinfo = &u[scheme + 3..at];
                    if found.is_none() {
                        found = Some(match userinfo.split_once(':') {
                            Some((user, pass)) => (user.to_owned(), Some(pass.to_owned())),
                            None => (userinfo.to_owned(), None),
                        });
                    }
                    format!("{}{}", &u[..scheme + 3], &u[at + 1..])
                }
                _ => u.to_owned(),
            }
        })
        .collect();
    (urls.join(","), found)
}

/// Applies credentials and TLS to the connect options.
async fn with_auth(mut options: ConnectOptions, auth: &NatsAuth) -> anyhow::Result<ConnectOptions> {
    let secrets = [
        auth.password.is_some(),
        auth.nkey_seed_file.is_some(),
        auth.creds_file.is_some(),
    ];
    if secrets.iter().filter(|s| **s).count() > 1 {
        anyhow::bail!("give one of a NATS password, an nkey seed or a .creds file, not several");
    }
    if let Some(path) = &auth.creds_file {
        options = options
            .credentials_file(path)
            .await
            .with_context(|| format!("reading the NATS credentials file {}", path.display()))?;
    }
    if let Some(path) = &auth.nkey_seed_file {
        let seed = tokio::fs::read_to_string(path)
            .await
            .with_context(|| format!("reading the NATS nkey seed {}", path.display()))?;
        options = options.nkey(seed.trim().to_owned());
    }
    match (&auth.user, &auth.password) {
        (Some(u), Some(p)) => options = options.user_and_password(u.clone(), p.clone()),
        (None, Some(_)) => anyhow::bail!("a NATS password needs a user"),
        _ => {}
    }
    if let Some(ca) = &auth.tls_ca {
        options = options.add_root_certificates(ca.clone());
    }
    match (&auth.tls_cert, &auth.tls_key) {
        (Some(c), Some(k)) => options = options.add_client_certificate(c.clone(), k.clone()),
        (None, None) => {}
        _ => anyhow::bail!("a NATS client certificate needs both the certificate and its key"),
    }
    Ok(options.require_tls(auth.tls_required))
}

/// How long a publish waits for JetStream's ack (and a JetStream API call
/// for its answer). A stream whose leader moved answers within a few
/// seconds; past this the relay tries again and keeps the rows.
pub const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// How often the client pings the server it is connected to.
pub const PING_INTERVAL: Duration = Duration::from_secs(3);

/// Exponential backoff from 100 ms to 2 s, each delay drawn at random from
/// its upper half, so that the replicas of every service do not reconnect
/// to a recovering cluster in lockstep.
pub fn reconnect_delay(attempt: usize) -> Duration {
    RETRY.jittered(attempt.min(31) as u32, rand::random())
}

/// Reconnects and provisioning retries.
const RETRY: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));

/// The NATS connection and JetStream context of one service.
#[derive(Clone)]
pub struct Bus {
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub config: Arc<BusConfig>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bus").field("config", &self.config).finish()
    }
}

impl Bus {
    /// Starts connecting; returns at once. The client keeps (re)connecting in
    /// the background and `on_state(connected)` is called on every change.
    pub async fn connect(
        config: BusConfig,
        client_name: &str,
        on_state: impl Fn(bool) + Send + Sync + 'static,
    ) -> anyhow::Result<Bus> {
        let on_state = Arc::new(on_state);
        let (urls, in_url) = split_url_credentials(&config.url);
        let mut auth = config.auth.clone();
        match in_url {
            Some((user, Some(pass))) if auth.user.is_none() && auth.password.is_none() => {
                auth.user = Some(user);
                auth.password = Some(pass);
            }
            Some((token, None)) if auth.user.is_none() && auth.password.is_none() => {
                // `nats://TOKEN@host`: token authentication.
                auth.password = Some(token);
            }
            _ => {}
        }
        let token = match (&auth.user, &auth.password) {
            (None, Some(t)) => Some(t.clone()),
            _ => None,
        };
        if token.is_some() {
            auth.password = None;
        }
        let mut options = with_auth(ConnectOptions::new(), &auth).await?;
        if let Some(t) = token {
            options = options.token(t);
        }
        let client = options
            .name(client_name)
            // Replies (publish acks, fetched messages) come to an inbox of
            // this service's own: its NATS user may subscribe to nothing else.
            .custom_inbox_prefix(gpualloc_nats_acl::inbox_prefix(client_name))
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(reconnect_delay)
            // A member cut off by a partition goes silent rather than
            // closing the connection: two unanswered pings (about 3 s
            // apart) move the client to another member instead of the
            // default two minutes.
            .ping_interval(PING_INTERVAL)
            .event_callback(move |event| {
                let on_state = on_state.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            tracing::info!("NATS connected");
                            on_state(true)
                        }
                        async_nats::Event::Disconnected => {
                            tracing::warn!("NATS disconnected");
                            on_state(false)
                        }
                        async_nats::Event::ServerError(e) => {
                            // Permission violations and authorization errors
                            // come this way: a misconfigured user, or an
                            // attempt to do what the user may not.
                            tracing::error!(error = %e, "NATS server error")
                        }
                        other => tracing::info!(event = %other, "NATS event"),
                    }
                }
            })
            // A list: the client library reads one string as one server.
            .connect(urls.split(',').map(str::trim).collect::<Vec<&str>>())
            .await
            .with_context(|| {
                format!(
                    "connecting to NATS at {}",
                    gpualloc_storage::redact_url(&config.url)
                )
            })?;
        let mut js = jetstream::new(client.clone());
        js.set_timeout(ACK_TIMEOUT);
        Ok(Bus {
            client,
            js,
            config: Arc::new(config),
        })
    }

    pub fn is_connected(&self) -> bool {
        self.client.connection_state() == State::Connected
    }

    /// Absolute subject for a relative one (see [`crate::subjects`]).
    pub fn subject(&self, relative: &str) -> String {
        format!("{}.{relative}", self.config.prefix)
    }

    /// Creates the stream if it does not exist. Safe to call from every
    /// replica at every start.
    pub async fn provision(&self) -> anyhow::Result<stream::Stream> {
        let c = &self.config;
        let config = stream::Config {
            name: c.stream.clone(),
            subjects: vec![format!("{}.>", c.prefix)],
            storage: stream::StorageType::File,
            retention: stream::RetentionPolicy::Limits,
            num_replicas: c.stream_replicas,
            max_age: c.max_age,
            duplicate_window: c.duplicate_window,
            ..Default::default()
        };
        self.js
            .get_or_create_stream(config)
            .await
            .map_err(|e| anyhow::Error::from_boxed(Box::new(e)))
            .with_context(|| format!("provisioning JetStream stream {}", c.stream))
    }

    /// Waits until [`Bus::provision`] succeeds, retrying with backoff, or
    /// `cancel` fires.
    pub async fn provision_with_retry(
        &self,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> Option<stream::Stream> {
        for attempt in 0.. {
            match self.provision().await {
                Ok(s) => return Some(s),
                Err(e) => tracing::warn!(error = format!("{e:#}"), "JetStream not ready yet"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(RETRY.delay(attempt)) => {}
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{reconnect_delay, split_url_credentials};

    #[test]
    fn reconnects_back_off_with_jitter() {
        for attempt in 0..20 {
            let ceiling = Duration::from_millis((100u64 << attempt.min(5)).min(2_000));
            let d = reconnect_delay(attempt);
            assert!(d <= ceiling && d >= ceiling / 2, "{attempt}: {d:?}");
        }
        let draws: std::collections::BTreeSet<Duration> =
            (0..50).map(|_| reconnect_delay(6)).collect();
        assert!(draws.len() > 10, "not jittered: {draws:?}");
    }

    #[test]
    fn credentials_come_out_of_urls() {
        assert_eq!(
            split_url_credentials("nats://svc:pw@a:4222, nats://b:4222"),
            (
                "nats://a:4222,nats://b:4222".to_owned(),
                Some(("svc".to_owned(), Some("pw".to_owned())))
            )
        );
        assert_eq!(
            split_url_credentials("tls://tok@a:4222"),
            ("tls://a:4222".to_owned(), Some(("tok".to_owned(), None)))
        );
        assert_eq!(
            split_url_credentials("nats://a:4222"),
            ("nats://a:4222".to_owned(), None)
        );
    }
}
