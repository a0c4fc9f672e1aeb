//! `LIMIT n` written into the SQL text instead of bound as a parameter.
//!
//! SQLite (3.46 and later) reads the value of a bound LIMIT while planning
//! and marks the statement to be prepared again whenever that parameter is
//! bound, and diesel binds every parameter on every execution. A query with
//! `.limit(n)` is therefore parsed and planned again each time it runs: a
//! tenth of a busy viewer's CPU went to re-preparing its watch and outbox
//! polls. For the fixed batch sizes of the hot polls, a literal keeps the
//! prepared statement (distinct values are distinct cached statements).
//! User-chosen page sizes keep `.limit()`; they vary anyway.

use diesel::{
    QueryResult, RunQueryDsl,
    backend::Backend,
    query_builder::{AstPass, Query, QueryFragment, QueryId},
};

/// A query followed by `LIMIT n` with `n` in the SQL text.
#[derive(Clone, Copy, Debug)]
pub struct WithLiteralLimit<Q> {
    query: Q,
    limit: u32,
}

impl<Q: Query> Query for WithLiteralLimit<Q> {
    type SqlType = Q::SqlType;
}

// Not a static id: the statement cache keys it by its SQL, which holds the
// limit.
impl<Q> QueryId for WithLiteralLimit<Q> {
    type QueryId = ();
    const HAS_STATIC_QUERY_ID: bool = false;
}

impl<Q, DB> QueryFragment<DB> for WithLiteralLimit<Q>
where
    DB: Backend,
    Q: QueryFragment<DB>,
{
    fn walk_ast<'b>(&'b self, mut out: AstPass<'_, 'b, DB>) -> QueryResult<()> {
        self.query.walk_ast(out.reborrow())?;
        out.push_sql(" LIMIT ");
        out.push_sql(&self.limit.to_string());
        Ok(())
    }
}

impl<Q, Conn> RunQueryDsl<Conn> for WithLiteralLimit<Q> {}

/// Adds [`WithLiteralLimit`] to any complete query (after its `ORDER BY`, with
/// no `.limit()` of its own).
pub trait LiteralLimitExt: Query + Sized {
    fn limit_literal(self, limit: u32) -> WithLiteralLimit<Self> {
        WithLiteralLimit { query: self, limit }
    }
}

impl<Q: Query> LiteralLimitExt for Q {}
