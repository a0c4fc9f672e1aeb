//! Serialisation points. Updating a named row takes its row lock on
//! PostgreSQL until commit, so every transaction that starts with
//! [`acquire`] on the same name runs one after another across all replicas;
//! on SQLite writers are serialised anyway. Portable, unlike advisory locks
//! or `SELECT … FOR UPDATE`, which the multi-backend cannot express.

use diesel::prelude::*;

use crate::{DbConnection, Native};

diesel::table! {
    saga_locks (name) {
        name -> Text,
        counter -> BigInt,
    }
}

/// Takes the lock `name` for the rest of the transaction.
pub fn acquire(conn: &mut DbConnection, name: &str) -> QueryResult<()> {
    let n = diesel::update(saga_locks::table.find(name))
        .set(saga_locks::counter.eq(saga_locks::counter + 1))
        .execute_native(conn)?;
    if n == 0 {
        // First use: create the row; a concurrent creator makes this fail on
        // the primary key and the caller's transaction is retried.
        diesel::insert_into(saga_locks::table)
            .values((saga_locks::name.eq(name), saga_locks::counter.eq(1)))
            .execute_native(conn)?;
    }
    Ok(())
}
