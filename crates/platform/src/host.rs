//! Start-up, readiness and shutdown of one service process.
//!
//! Start-up never blocks serving: the gRPC port answers at once (health
//! NOT_SERVING, other RPCs UNAVAILABLE until the database is ready) while a
//! background task connects the database (and migrates), then NATS (and
//! provisions the stream), then starts the relay and the service's
//! consumers. Health is SERVING once the database answers and the stream
//! exists, and only while the database keeps answering (a broker outage
//! does not take a replica out: see `Flags::serving`).
//!
//! Shutdown runs in this order: health NOT_SERVING; optional delay for load
//! balancers; stop accepting and finish in-flight RPCs; stop consumers
//! (each finishes and acks its batch); flush the outbox; exit.

use std::{
    future::Future,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use gpualloc_saga::{Bus, Consumer, ConsumerSpec, Handler, Outbox, Relay, RelayConfig};
use gpualloc_storage::{Backend, Db, Migration};
use tokio::{net::TcpListener, sync::OnceCell};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tonic::{Status, service::Routes};
use tonic_health::{ServingStatus, server::HealthReporter};

use crate::CommonConfig;

/// The database once it is ready; RPCs before that get UNAVAILABLE.
#[derive(Clone, Default)]
pub struct DbHandle(Arc<OnceCell<Db>>);

impl std::fmt::Debug for DbHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("DbHandle").field(&self.0.get()).finish()
    }
}

impl DbHandle {
    pub fn get(&self) -> Result<&Db, Status> {
        self.0.get().ok_or_else(|| {
            crate::status::unavailable(
                "starting up: the database is not ready yet",
                Duration::from_secs(1),
            )
        })
    }

    /// A handle that is ready at once (tests of handlers).
    pub fn ready(db: Db) -> Self {
        let h = Self::default();
        let _ = h.0.set(db);
        h
    }
}

/// Pings the database every second: two failures in a row (or a ping
/// slower than two seconds) take the replica out of the balance (health
/// NOT_SERVING) until one succeeds — a database restart or failover shows
/// as a NOT_SERVING replica, not as a stream of errors to its callers. The
/// connection pool reconnects by itself.
async fn watch_db(db: Db, flags: Arc<Flags>, cancel: CancellationToken) {
    const EVERY: Duration = Duration::from_secs(1);
    let mut failures = 0u32;
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
        let ok = matches!(tokio::time::timeout(2 * EVERY, db.ping()).await, Ok(Ok(())));
        failures = if ok { 0 } else { failures + 1 };
        let up = failures < 2;
        if up != flags.db.load(Ordering::SeqCst) {
            if up {
                tracing::info!("database answers again");
            } else {
                tracing::error!("database does not answer; reporting NOT_SERVING");
            }
            flags.set(&flags.db, up);
        }
    }
}

#[derive(Default)]
struct Flags {
    db: AtomicBool,
    stream: AtomicBool,
    stopping: AtomicBool,
    changed: tokio::sync::Notify,
}

impl Flags {
    fn set(&self, flag: &AtomicBool, v: bool) {
        flag.store(v, Ordering::SeqCst);
        self.changed.notify_one();
    }

    /// NATS is needed once, to provision the stream; a later broker outage
    /// leaves the replica SERVING, since every RPC still works (writes wait
    /// in the outbox, shown by `gpualloc_outbox_backlog` and
    /// `gpualloc_nats_connected`): taking every replica out of the balance
    /// would turn a broker outage into a full one.
    fn serving(&self) -> bool {
        self.db.load(Ordering::SeqCst)
            && self.stream.load(Ordering::SeqCst)
            && !self.stopping.load(Ordering::SeqCst)
    }
}

/// What a service gets once NATS is ready: the place to start consumers
/// and other background work.
pub struct BusReady {
    pub db: Db,
    /// The unit of work for background writers (reconcilers, sweepers).
    pub outbox: Outbox,
    pub bus: Bus,
    pub relay: Relay,
    pub origin: String,
    ack_wait: Duration,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl BusReady {
    /// Runs a durable consumer until shutdown.
    pub fn spawn_consumer<H: Handler>(&self, mut spec: ConsumerSpec, handler: Arc<H>) {
        spec.ack_wait = self.ack_wait;
        self.tasks.spawn(Consumer::run(
            self.outbox.clone(),
            self.bus.clone(),
            spec,
            handler,
            self.cancel.clone(),
        ));
    }

    /// Runs background work until shutdown (the token fires when it must
    /// stop).
    pub fn spawn<F, Fut>(&self, f: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.tasks.spawn(f(self.cancel.clone()));
    }
}

/// One service process.
pub struct Platform {
    name: &'static str,
    grpc_name: &'static str,
    metrics_port: u16,
    config: CommonConfig,
    origin: String,
    db: DbHandle,
    relay: Relay,
    flags: Arc<Flags>,
    /// Fires when shutdown begins (streams end, health goes NOT_SERVING).
    stopping: CancellationToken,
    /// Fires once RPCs are drained (consumers, relay, start-up stop).
    background: CancellationToken,
    tasks: TaskTracker,
    health: HealthReporter,
    /// Health and reflection, to which the service adds its own.
    routes: Option<Routes>,
}

impl Platform {
    /// `name` is the short service name (durable consumer, NATS client
    /// name); `grpc_name` the fully-qualified gRPC service for health.
    /// `metrics_port` is the service's own default for `/metrics` (the
    /// setting `GPUALLOC_METRICS_LISTEN` overrides it).
    pub fn new(
        name: &'static str,
        grpc_name: &'static str,
        metrics_port: u16,
        config: CommonConfig,
    ) -> Platform {
        let (health, health_service) = tonic_health::server::health_reporter();
        let origin = config.replica_id.clone().unwrap_or_else(|| {
            format!("{name}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
        });
        Platform {
            name,
            grpc_name,
            metrics_port,
            config,
            origin,
            db: DbHandle::default(),
            relay: Relay::new(),
            flags: Arc::new(Flags::default()),
            stopping: CancellationToken::new(),
            background: CancellationToken::new(),
            tasks: TaskTracker::new(),
            health,
            routes: Some(Routes::new(health_service)),
        }
    }

    pub fn db(&self) -> DbHandle {
        self.db.clone()
    }

    pub fn relay(&self) -> Relay {
        self.relay.clone()
    }

    /// This replica's id (outbox origin).
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Fires when shutdown begins: long-lived streams should end then.
    pub fn stopping(&self) -> CancellationToken {
        self.stopping.clone()
    }

    /// Starts the background start-up: database and migrations, then NATS,
    /// the stream, the relay and whatever `on_bus` starts.
    pub fn start<F>(&self, migrations: &'static [Migration], on_bus: F)
    where
        F: FnOnce(BusReady) + Send + 'static,
    {
        let config = self.config.clone();
        let db_cell = self.db.clone();
        let flags = self.flags.clone();
        let cancel = self.background.clone();
        let tasks = self.tasks.clone();
        let relay = self.relay.clone();
        let origin = self.origin.clone();
        let name = self.name;
        self.tasks.spawn(async move {
            let Some(db) = connect_db(&config, migrations, &cancel).await else {
                return;
            };
            let _ = db_cell.0.set(db.clone());
            flags.set(&flags.db, true);
            tracing::info!(backend = ?db.backend(), "database ready");
            tasks.spawn(watch_db(db.clone(), flags.clone(), cancel.clone()));

            let connected = gpualloc_telemetry::METRICS
                .nats_connected
                .get_or_create(&gpualloc_telemetry::labels([("service", name)]))
                .clone();
            let bus = loop {
                let gauge = connected.clone();
                match Bus::connect(config.bus(), name, move |up| {
                    gauge.set(i64::from(up));
                })
                .await
                {
                    Ok(bus) => break bus,
                    Err(e) => {
                        tracing::error!(error = format!("{e:#}"), "invalid NATS settings");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                        }
                    }
                }
            };
            if bus.provision_with_retry(&cancel).await.is_none() {
                return;
            }
            connected.set(i64::from(bus.is_connected()));
            flags.set(&flags.stream, true);
            tracing::info!(stream = %config.stream, prefix = %config.subject_prefix, "JetStream ready");

            let mut relay_config = RelayConfig::new(origin.clone());
            relay_config.service = name.to_owned();
            if db.backend() == Backend::Sqlite {
                // One process per SQLite file: every pending row is ours.
                relay_config.foreign_grace = Duration::ZERO;
            }
            tasks.spawn(relay.clone().run(
                db.clone(),
                bus.clone(),
                relay_config,
                cancel.clone(),
                config.shutdown_grace / 2,
            ));
            on_bus(BusReady {
                outbox: Outbox::new(db.clone(), relay.clone(), &origin),
                db,
                bus,
                relay,
                origin,
                ack_wait: config.ack_wait,
                cancel,
                tasks: tasks.clone(),
            });
        });

        let flags = self.flags.clone();
        let health = self.health.clone();
        let grpc_name = self.grpc_name;
        let stop = self.background.clone();
        self.tasks.spawn(async move {
            let mut last = None;
            loop {
                let status = if flags.serving() {
                    ServingStatus::Serving
                } else {
                    ServingStatus::NotServing
                };
                if last != Some(status) {
                    health.set_service_status("", status).await;
                    health.set_service_status(grpc_name, status).await;
                    tracing::info!(?status, "health");
                    last = Some(status);
                }
                tokio::select! {
                    _ = flags.changed.notified() => {}
                    _ = stop.cancelled() => return,
                }
            }
        });
    }

    /// Serves the service's gRPC services (added by `add_services` to the
    /// health and reflection routes) on `listener` until `shutdown`
    /// resolves, then shuts down in order (see the module docs).
    pub async fn serve(
        mut self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
        add_services: impl FnOnce(Routes) -> Routes,
    ) -> anyhow::Result<()> {
        let addr = listener.local_addr()?;
        let routes = self
            .routes
            .take()
            .ok_or_else(|| anyhow::anyhow!("serve called twice"))?;
        // Initial NOT_SERVING so that a check before start-up completes gets
        // an answer rather than NOT_FOUND.
        self.health
            .set_service_status("", ServingStatus::NotServing)
            .await;
        self.health
            .set_service_status(self.grpc_name, ServingStatus::NotServing)
            .await;

        // Every gpualloc file is registered (so `describe` resolves every
        // type), and google.rpc's error details (so grpcurl decodes them),
        // but only the services this process serves are listed.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(gpualloc_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(gpualloc_proto::RPC_DETAILS_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .with_service_name(self.grpc_name)
                .with_service_name("grpc.health.v1.Health")
        };
        let reflection_v1 = reflection().build_v1()?;
        let reflection_v1alpha = reflection().build_v1alpha()?;
        let routes = add_services(routes)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);

        let flags = self.flags.clone();
        let stopping = self.stopping.clone();
        let health = self.health.clone();
        let grpc_name = self.grpc_name;
        let delay = self.config.shutdown_delay;
        let signal = async move {
            shutdown.await;
            stopping.cancel();
            flags.set(&flags.stopping, true);
            // Report NOT_SERVING before refusing connections.
            health
                .set_service_status("", ServingStatus::NotServing)
                .await;
            health
                .set_service_status(grpc_name, ServingStatus::NotServing)
                .await;
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            tracing::info!("draining in-flight RPCs");
        };

        if let Some(metrics_addr) = self
            .config
            .metrics_addr(self.metrics_port)
            .map_err(|e| anyhow::anyhow!(e))?
        {
            let listener = TcpListener::bind(metrics_addr).await.map_err(|e| {
                anyhow::anyhow!("binding the metrics endpoint on {metrics_addr}: {e}")
            })?;
            tokio::spawn(gpualloc_telemetry::metrics::serve(
                listener,
                self.background.clone(),
            ));
        }

        let auth = crate::auth::Authenticator::new(&self.config.auth).await?;
        auth.spawn_refresh(self.background.clone());

        let tls = self.config.server_tls()?;
        tracing::info!(service = self.name, %addr, replica = %self.origin, auth = ?auth.mode(), tls = tls.is_some(), "serving gRPC");
        let mut server = tonic::transport::Server::builder();
        if let Some(tls) = tls {
            server = server.tls_config(tls)?;
        }
        server
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .layer(crate::layers::stack(self.config.protection(), auth))
            .add_routes(routes)
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                signal,
            )
            .await?;

        tracing::info!("RPCs drained; stopping consumers and flushing the outbox");
        self.background.cancel();
        self.tasks.close();
        if tokio::time::timeout(self.config.shutdown_grace, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop within the shutdown grace");
        }
        tracing::info!(service = self.name, "stopped");
        Ok(())
    }
}

async fn connect_db(
    config: &CommonConfig,
    migrations: &'static [Migration],
    cancel: &CancellationToken,
) -> Option<Db> {
    let retry = gpualloc_domain::Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let mut tries = 0;
    loop {
        let attempt = async {
            if config.create_database {
                Db::create_database_if_missing(&config.database_url).await?;
            }
            let db = Db::connect(&config.database_url, config.db_options()).await?;
            db.migrate(&[gpualloc_storage::MIGRATIONS, migrations])
                .await?;
            Ok::<_, gpualloc_storage::DbError>(db)
        };
        match attempt.await {
            Ok(db) => return Some(db),
            Err(e) => tracing::warn!(error = %e, "database not ready; retrying"),
        }
        tokio::select! {
            _ = cancel.cancelled() => return None,
            _ = tokio::time::sleep(retry.delay(tries)) => {}
        }
        tries += 1;
    }
}
