//! The runtime every gpualloc service is built on. A service crate brings
//! its gRPC handlers, migrations and saga handlers; this crate runs them:
//! it binds nothing itself (tests pass a `127.0.0.1:0` listener), connects
//! the database and NATS with retries while already answering health
//! checks (NOT_SERVING until both are ready), starts the outbox relay and
//! consumers, serves reflection, and on shutdown drains RPCs before it stops
//! consumers and flushes the outbox.

pub mod auth;
pub mod config;
pub mod host;
pub mod identity;
pub mod layers;
pub mod outbox_cmd;
pub mod propagation;
pub mod shutdown;
pub mod status;
pub mod telemetry;

pub use auth::{AuthConfig, AuthMode, Authenticator};
pub use config::CommonConfig;
pub use gpualloc_auth::truncate;
pub use host::{BusReady, DbHandle, Platform};
pub use identity::{Caller, CallerExt};
