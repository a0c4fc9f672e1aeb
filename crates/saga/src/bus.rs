use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use async_nats::{
    ConnectOptions,
    connection::State,
    jetstream::{self, stream},
};

/// Where the saga's events live.
#[derive(Clone, Debug)]
pub struct BusConfig {
    /// NATS server URL(s), comma-separated.
    pub url: String,
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
        }
    }
}

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
        let client = ConnectOptions::new()
            .name(client_name)
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(Duration::from_secs(2))
            .reconnect_delay_callback(|attempt| {
                Duration::from_millis((100u64 << attempt.min(5)).min(2_000))
            })
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
                        other => tracing::info!(event = %other, "NATS event"),
                    }
                }
            })
            .connect(config.url.as_str())
            .await
            .with_context(|| format!("connecting to NATS at {}", config.url))?;
        let js = jetstream::new(client.clone());
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
        let mut delay = Duration::from_millis(100);
        loop {
            match self.provision().await {
                Ok(s) => return Some(s),
                Err(e) => tracing::warn!(error = format!("{e:#}"), "JetStream not ready yet"),
            }
            tokio::select! {
                _ = cancel.cancelled() => return None,
                _ = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(Duration::from_secs(2));
        }
    }
}
