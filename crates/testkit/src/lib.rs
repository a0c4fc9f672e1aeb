//! Test support shared by every crate's integration tests: a NATS JetStream
//! server per test process (or the one `cargo xtask test` started), a fresh
//! database per test on SQLite or PostgreSQL, unique stream names, and
//! polling with a deadline instead of sleeps, an HTTP receiver that
//! records what is sent to it, and bearer tokens the services under test
//! accept ([`auth`]).
//!
//! Every test process starts its own `nats-server`, with the services'
//! users and permissions (`gpualloc-nats-acl`) and passwords of its own.
//!
//! Environment (set by `cargo xtask test`):
//! - `GPUALLOC_TEST_DATABASE_URL`: a PostgreSQL server URL whose user may
//!   create databases; defaults to `postgres://postgres@127.0.0.1:5432/postgres`.

#![allow(clippy::unwrap_used)]

pub mod auth;
mod db;
mod grpcurl;
mod http;
mod nats;
mod nats_cluster;
mod pg_server;

use std::{future::Future, time::Duration};

pub use db::{TestDb, postgres_admin_url};
pub use grpcurl::grpcurl;
pub use http::{HttpReceiver, Received};
pub use nats::{
    NatsServer, free_port, free_port_for_restarts, nats_config, nats_connect_as, nats_password,
    nats_url, nats_url_as,
};
pub use nats_cluster::{ClusterNode, NatsCluster};
pub use pg_server::PgServer;

/// A short random name for streams, prefixes and databases.
pub fn unique_name(prefix: &str) -> String {
    format!(
        "{prefix}{}",
        &uuid::Uuid::new_v4().simple().to_string()[..12]
    )
}

/// Polls `probe` until it returns `Some`, or panics with `what` after
/// `deadline`. Polling is the synchronisation; the short pause between polls
/// only avoids a busy loop.
pub async fn eventually<T, F, Fut>(deadline: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = tokio::time::Instant::now();
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        if start.elapsed() > deadline {
            panic!("timed out after {deadline:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Generates one `#[tokio::test]` per backend for a suite function taking a
/// database URL: `backend_tests!(my_suite);` yields `my_suite::sqlite` and
/// `my_suite::postgres`.
#[macro_export]
macro_rules! backend_tests {
    ($($suite:ident),* $(,)?) => {
        $(
            mod $suite {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    let db = $crate::TestDb::sqlite();
                    super::$suite(db.url.clone()).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    let db = $crate::TestDb::postgres();
                    super::$suite(db.url.clone()).await;
                }
            }
        )*
    };
}
