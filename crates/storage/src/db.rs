//! `Db`: connection pools for PostgreSQL or SQLite on the blocking thread
//! pool, transactions that retry what is worth retrying, a liveness ping,
//! database creation and URL redaction for logs.

use std::{
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use deadpool::{
    Runtime,
    managed::{self, Metrics, RecycleError, RecycleResult},
};
use deadpool_sync::SyncWrapper;
use diesel::{Connection, PgConnection, SqliteConnection, connection::SimpleConnection};

use crate::{DbConnection, DbError, Migration, TxError, migrate};

/// Which database a [`Db`] talks to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

/// Pool sizing.
#[derive(Clone, Debug)]
pub struct DbOptions {
    /// Connections per pool (PostgreSQL) or read connections (SQLite).
    pub pool_size: usize,
    /// How long a caller waits for a free connection before failing.
    pub wait_timeout: Duration,
}

impl Default for DbOptions {
    fn default() -> Self {
        Self {
            pool_size: 8,
            wait_timeout: Duration::from_secs(10),
        }
    }
}

/// Our own deadpool manager (instead of deadpool-diesel's) for two reasons:
/// SQLite connections need their pragmas on every new connection, and the
/// multi-backend `establish` hides the real connect error, which operators
/// need to see.
pub(crate) struct Manager {
    backend: Backend,
    url: String,
}

impl managed::Manager for Manager {
    type Type = SyncWrapper<DbConnection>;
    type Error = DbError;

    async fn create(&self) -> Result<Self::Type, DbError> {
        let (backend, url) = (self.backend, self.url.clone());
        SyncWrapper::new(Runtime::Tokio1, move || establish(backend, &url)).await
    }

    async fn recycle(&self, obj: &mut Self::Type, _: &Metrics) -> RecycleResult<DbError> {
        use diesel::connection::TransactionManager;
        fn is_broken(c: &mut DbConnection) -> bool {
            <DbConnection as Connection>::TransactionManager::is_broken_transaction_manager(c)
        }
        // The check reads the transaction manager's state in memory: done
        // here, not on the blocking pool, it saves a thread hand-off on
        // every checkout. An idle connection's lock is free; it is held
        // only if a cancelled caller's closure still runs, then wait.
        let checked = match obj.try_lock() {
            Ok(mut c) => Some(is_broken(&mut c)),
            Err(std::sync::TryLockError::WouldBlock) => None,
            Err(std::sync::TryLockError::Poisoned(_)) => {
                return Err(RecycleError::message("connection mutex poisoned"));
            }
        };
        let broken = match checked {
            Some(broken) => broken,
            None => obj
                .interact(is_broken)
                .await
                .map_err(|e| RecycleError::message(format!("{e}")))?,
        };
        if broken {
            return Err(RecycleError::message("connection left in a transaction"));
        }
        Ok(())
    }
}

fn establish(backend: Backend, url: &str) -> Result<DbConnection, DbError> {
    let conn = match backend {
        Backend::Postgres => PgConnection::establish(url).map(DbConnection::Postgresql),
        Backend::Sqlite => SqliteConnection::establish(url).map(DbConnection::Sqlite),
    };
    let mut conn = conn.map_err(|source| {
        let url = redact(url);
        tracing::warn!(%url, error = %source, "database connection failed");
        DbError::Connect { url, source }
    })?;
    if backend == Backend::Sqlite {
        // WAL lets readers run beside the writer; synchronous=FULL makes every
        // commit durable (an acknowledged allocation must survive power loss);
        // busy_timeout covers other processes on the same file, and comes
        // first: switching to WAL needs a lock that a process closing the
        // file (checkpointing its WAL) may hold for a moment. temp_store
        // keeps the statement journal of each group-commit savepoint in
        // memory: it spilled to a temporary file and was 7% of a busy
        // writer's CPU in file writes.
        conn.batch_execute(
            "PRAGMA busy_timeout = 10000; PRAGMA journal_mode = WAL; \
             PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
             PRAGMA temp_store = MEMORY;",
        )?;
    }
    Ok(conn)
}

/// Hides the credentials of a URL (or comma-separated URLs) for logs and
/// errors: a password becomes `***`, and so does a bare token before `@`
/// where the scheme uses one (NATS).
pub fn redact_url(url: &str) -> String {
    url.split(',').map(redact_one).collect::<Vec<_>>().join(",")
}

fn redact_one(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let head = &url[..scheme + 3];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{head}{user}:***{}", &url[at..]),
                None if head.trim().starts_with("nats") || head.trim().starts_with("tls") => {
                    format!("{head}***{}", &url[at..])
                }
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

fn redact(url: &str) -> String {
    redact_url(url)
}

type Pool = managed::Pool<Manager>;
pub(crate) type WritePool = Pool;

struct Inner {
    backend: Backend,
    url: String,
    write: Pool,
    read: Pool,
    /// SQLite: writes go through group commit (see [`crate::group`]).
    group: Option<crate::group::Queue>,
    /// Bumped after every write transaction of this `Db` ends, committed or
    /// not (see [`Db::write_generation`]).
    writes: Arc<AtomicU64>,
}

/// A service's database: a pool for write transactions and one for reads.
///
/// On PostgreSQL both are the same pool. On SQLite writes go through a
/// single connection: SQLite has one writer anyway, and funnelling writers
/// through one connection avoids the lock-upgrade deadlocks of concurrent
/// deferred transactions, while WAL readers proceed in parallel.
#[derive(Clone)]
pub struct Db {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("backend", &self.inner.backend)
            .field("url", &self.inner.url)
            .finish()
    }
}

impl Db {
    /// Opens pools for `url`: `postgres://…`/`postgresql://…`, or a SQLite
    /// file as `sqlite://path`, `sqlite:path` or a plain path (its folder is
    /// created). Connects once eagerly so that a wrong URL fails here.
    pub async fn connect(url: &str, options: DbOptions) -> Result<Db, DbError> {
        let (backend, conn_url) = if url.starts_with("postgres://")
            || url.starts_with("postgresql://")
        {
            (Backend::Postgres, url.to_owned())
        } else {
            let path = url
                .strip_prefix("sqlite://")
                .or_else(|| url.strip_prefix("sqlite:"))
                .unwrap_or(url);
            if let Some(parent) = Path::new(path).parent()
                && !parent.as_os_str().is_empty()
            {
                std::fs::create_dir_all(parent)
                    .map_err(|e| DbError::Pool(format!("creating {}: {e}", parent.display())))?;
            }
            (Backend::Sqlite, path.to_owned())
        };
        let build = |size: usize| {
            Pool::builder(Manager {
                backend,
                url: conn_url.clone(),
            })
            .max_size(size.max(1))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(options.wait_timeout))
            .create_timeout(Some(Duration::from_secs(15)))
            .build()
            .map_err(|e| DbError::Pool(e.to_string()))
        };
        let write = build(match backend {
            Backend::Postgres => options.pool_size,
            Backend::Sqlite => 1,
        })?;
        let read = match backend {
            Backend::Postgres => write.clone(),
            Backend::Sqlite => build(options.pool_size)?,
        };
        let writes = Arc::new(AtomicU64::new(0));
        let group = (backend == Backend::Sqlite)
            .then(|| crate::group::start(write.clone(), writes.clone()));
        let db = Db {
            inner: Arc::new(Inner {
                backend,
                url: redact(url),
                write,
                read,
                group,
                writes,
            }),
        };
        // Fail fast with the real error rather than at the first query.
        drop(db.inner.write.get().await.map_err(pool_error)?);
        Ok(db)
    }

    /// Creates the PostgreSQL database `url` names, if it does not exist,
    /// by connecting to the server's `postgres` database. A no-op for SQLite
    /// (the file is created on connect).
    pub async fn create_database_if_missing(url: &str) -> Result<(), DbError> {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            return Ok(());
        }
        let url = url.to_owned();
        tokio::task::spawn_blocking(move || create_database(&url))
            .await
            .map_err(|e| DbError::Panic(e.to_string()))?
    }

    pub fn backend(&self) -> Backend {
        self.inner.backend
    }

    /// Applies every migration of `sets` not applied yet, in order, under a
    /// lock so that replicas starting together do not race.
    pub async fn migrate(&self, sets: &[&'static [Migration]]) -> Result<(), DbError> {
        let backend = self.inner.backend;
        let sets: Vec<&'static [Migration]> = sets.to_vec();
        self.with_conn(&self.inner.write, move |c| migrate::run(c, backend, &sets))
            .await?
    }

    /// Runs `f` in a write transaction on the blocking pool. Retryable
    /// failures ([`TxError::is_retryable`]) roll back and run `f` again, a
    /// few times, with a short backoff. On SQLite the transaction is a
    /// savepoint in a group commit ([`crate::group`]); it returns after the
    /// group committed.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: TxError,
        F: FnMut(&mut DbConnection) -> Result<T, E> + Send + 'static,
    {
        if let Some(queue) = &self.inner.group {
            let (reply, answer) = tokio::sync::oneshot::channel();
            queue
                .send(Box::new(crate::group::Item::new(f, reply)))
                .map_err(|_| E::from(DbError::Pool("the SQLite writer has stopped".into())))?;
            return answer
                .await
                .map_err(|_| E::from(DbError::Panic("a write in its group panicked".into())))?;
        }
        let writes = self.inner.writes.clone();
        self.transaction(&self.inner.write, f, Some(writes)).await
    }

    /// A counter that moves after every write transaction through this `Db`
    /// has ended, before its caller hears of it (even when the caller has
    /// gone away). Caches of what this process writes compare it: a value
    /// read before a query and unchanged after means no local write
    /// committed in between. Other processes' writes do not move it.
    pub fn write_generation(&self) -> u64 {
        self.inner.writes.load(Ordering::Acquire)
    }

    /// One round trip to the database (`SELECT 1`): whether it answers.
    pub async fn ping(&self) -> Result<(), DbError> {
        use diesel::RunQueryDsl as _;
        self.read_short(|c| {
            diesel::sql_query("SELECT 1")
                .execute(c)
                .map(|_| ())
                .map_err(DbError::from)
        })
        .await
    }

    /// Runs `f` in a read transaction (one consistent snapshot on SQLite;
    /// READ COMMITTED statements on PostgreSQL).
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: TxError,
        F: FnMut(&mut DbConnection) -> Result<T, E> + Send + 'static,
    {
        self.transaction(&self.inner.read, f, None).await
    }

    /// [`Db::read`] for a read on a hot path whose size does not grow with
    /// history — a lookup by key, one page, one poll, the pools' counters.
    /// On SQLite it runs on the calling task: such a read takes tens of
    /// microseconds, less than handing it to the blocking pool and waking
    /// the task again (measured on the saga at a fixed rate: 2.5% less CPU
    /// per allocation, a 15% lower p50). A read that grows with history (a
    /// count, a summary, a reconciler's sweep) must use [`Db::read`], which
    /// never blocks the runtime. On PostgreSQL, a network round trip, this
    /// is [`Db::read`].
    pub async fn read_short<T, E, F>(&self, mut f: F) -> Result<T, E>
    where
        T: Send + 'static,
        E: TxError,
        F: FnMut(&mut DbConnection) -> Result<T, E> + Send + 'static,
    {
        if self.inner.backend != Backend::Sqlite {
            return self.read(f).await;
        }
        let obj = self.inner.read.get().await.map_err(pool_error)?;
        let attempt = {
            let mut conn = obj
                .lock()
                .map_err(|e| DbError::Panic(format!("a read connection's lock: {e}")))?;
            // As `interact` does on the blocking pool: a panicking read is
            // an error for its caller, and the poisoned connection is
            // dropped when it goes back to the pool.
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| conn.transaction(&mut f)))
        };
        drop(obj);
        match attempt {
            // Busy (a checkpoint restarting the WAL): retried with waits,
            // which belong on the blocking pool.
            Ok(Err(e)) if e.is_retryable() => self.read(f).await,
            Ok(result) => result,
            Err(_) => Err(E::from(DbError::Panic("a read panicked".into()))),
        }
    }

    async fn transaction<T, E, F>(
        &self,
        pool: &Pool,
        mut f: F,
        writes: Option<Arc<AtomicU64>>,
    ) -> Result<T, E>
    where
        T: Send + 'static,
        E: TxError,
        F: FnMut(&mut DbConnection) -> Result<T, E> + Send + 'static,
    {
        self.with_conn(pool, move |conn| {
            let mut attempt = 0u32;
            let result = loop {
                match conn.transaction(&mut f) {
                    Err(e) if e.is_retryable() && attempt < 8 => {
                        attempt += 1;
                        // Runs on a blocking-pool thread, so sleeping here
                        // does not stall the async runtime.
                        std::thread::sleep(crate::TX_RETRY.delay(attempt - 1));
                    }
                    other => break other,
                }
            };
            if let Some(w) = writes {
                w.fetch_add(1, Ordering::AcqRel);
            }
            result
        })
        .await
        .map_err(E::from)?
    }

    async fn with_conn<T, F>(&self, pool: &Pool, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut DbConnection) -> T + Send + 'static,
    {
        let obj = pool.get().await.map_err(pool_error)?;
        obj.interact(f)
            .await
            .map_err(|e| DbError::Panic(e.to_string()))
    }

    /// Connections in use and idle, for metrics.
    pub fn pool_status(&self) -> (usize, usize) {
        let s = self.inner.write.status();
        (s.size - s.available, s.available)
    }
}

fn create_database(url: &str) -> Result<(), DbError> {
    use diesel::{RunQueryDsl, sql_query};
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let scheme_end = base.find("://").map(|i| i + 3).unwrap_or(0);
    let Some(slash) = base[scheme_end..].find('/').map(|i| scheme_end + i) else {
        return Ok(());
    };
    let name = &base[slash + 1..];
    if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
        return Err(DbError::Pool(format!(
            "database name {name:?} must be letters, digits and '_' to be created automatically"
        )));
    }
    let mut admin_url = format!("{}/postgres", &base[..slash]);
    if let Some(q) = query {
        admin_url.push('?');
        admin_url.push_str(q);
    }
    let mut conn = PgConnection::establish(&admin_url).map_err(|source| DbError::Connect {
        url: redact(&admin_url),
        source,
    })?;
    #[derive(diesel::QueryableByName)]
    struct Found {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let found: Found = sql_query("SELECT COUNT(*) AS n FROM pg_database WHERE datname = $1")
        .bind::<diesel::sql_types::Text, _>(name)
        .get_result(&mut conn)?;
    if found.n == 0 {
        tracing::info!(database = name, "creating database");
        // A concurrent creator (another replica) wins the race; fine.
        if let Err(e) = sql_query(format!("CREATE DATABASE \"{name}\"")).execute(&mut conn) {
            tracing::info!(error = %e, "CREATE DATABASE failed; it may exist now");
        }
    }
    Ok(())
}

fn pool_error(e: managed::PoolError<DbError>) -> DbError {
    match e {
        managed::PoolError::Backend(e) => e,
        other => DbError::Pool(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact("/tmp/x.db"), "/tmp/x.db");
        assert_eq!(
            super::redact_url("nats://svc:pw@a:4222,nats://tok@b:4222"),
            "nats://svc:***@a:4222,nats://***@b:4222"
        );
    }
}
