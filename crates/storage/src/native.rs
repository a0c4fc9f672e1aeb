//! Running a query on the backend's own connection.
//!
//! The multi-connection runs every query through a wrapper that writes the
//! whole SQL text and converts every bind on each execution, even when the
//! prepared statement is already cached: under saga load that was a fifth
//! of the services' CPU (docs/benchmarks.md). A query built with the DSL is
//! backend-independent until it runs, so these methods match on the
//! connection and run it on `PgConnection` or `SqliteConnection` directly,
//! where a query with a static shape is found in the statement cache by
//! its type and only its binds are collected.
//!
//! The transaction state lives in the inner connection either way, so these
//! mix freely with `RunQueryDsl` calls inside one transaction.

use diesel::{
    PgConnection, QueryResult, RunQueryDsl, SqliteConnection,
    query_dsl::{LoadQuery, methods::ExecuteDsl},
};

use crate::DbConnection;

/// `execute`, `load` and `get_result` on the inner connection; see the
/// module documentation.
pub trait Native: Sized {
    fn execute_native(self, conn: &mut DbConnection) -> QueryResult<usize>
    where
        Self: ExecuteDsl<PgConnection> + ExecuteDsl<SqliteConnection>,
    {
        crate::native!(conn, |c| ExecuteDsl::execute(self, c))
    }

    fn load_native<'query, U>(self, conn: &mut DbConnection) -> QueryResult<Vec<U>>
    where
        Self: RunQueryDsl<PgConnection>
            + RunQueryDsl<SqliteConnection>
            + LoadQuery<'query, PgConnection, U>
            + LoadQuery<'query, SqliteConnection, U>,
    {
        crate::native!(conn, |c| RunQueryDsl::load(self, c))
    }

    fn get_result_native<'query, U>(self, conn: &mut DbConnection) -> QueryResult<U>
    where
        Self: RunQueryDsl<PgConnection>
            + RunQueryDsl<SqliteConnection>
            + LoadQuery<'query, PgConnection, U>
            + LoadQuery<'query, SqliteConnection, U>,
    {
        crate::native!(conn, |c| RunQueryDsl::get_result(self, c))
    }
}

impl<T> Native for T {}

/// Runs `$body` with `$c` bound to the inner connection, for queries whose
/// type depends on the backend (`Selectable::as_select()` fixes it) and so
/// must be built once per backend.
#[macro_export]
macro_rules! native {
    ($conn:expr, |$c:ident| $body:expr) => {
        match $conn {
            $crate::DbConnection::Postgresql($c) => $body,
            $crate::DbConnection::Sqlite($c) => $body,
        }
    };
}
