//! The consumer inbox: one row per processed event, written in the same
//! transaction as the event's effect.

use diesel::prelude::*;

use crate::{DbConnection, Native};

diesel::table! {
    inbox (consumer, event_id) {
        consumer -> Text,
        event_id -> Text,
        processed_at -> BigInt,
    }
}

/// Records that `consumer` processes `event_id` now. Returns `false` when it
/// already did: the caller must then skip the event. A concurrent claim of
/// the same event by another replica fails the transaction on the primary
/// key, and the redelivery finds the row.
pub fn claim(
    conn: &mut DbConnection,
    consumer: &str,
    event_id: &str,
    now: i64,
) -> QueryResult<bool> {
    if seen(conn, consumer, event_id)? {
        return Ok(false);
    }
    record(conn, consumer, event_id, now)?;
    Ok(true)
}

/// Whether `consumer` already processed `event_id` (then it must skip it).
pub fn seen(conn: &mut DbConnection, consumer: &str, event_id: &str) -> QueryResult<bool> {
    let n: i64 = inbox::table
        .filter(inbox::consumer.eq(consumer))
        .filter(inbox::event_id.eq(event_id))
        .count()
        .get_result_native(conn)?;
    Ok(n > 0)
}

/// Records that `consumer` processed `event_id`, in the transaction of its
/// effect. A concurrent record by another replica fails the transaction on
/// the primary key; the redelivery then finds the row.
pub fn record(
    conn: &mut DbConnection,
    consumer: &str,
    event_id: &str,
    now: i64,
) -> QueryResult<()> {
    diesel::insert_into(inbox::table)
        .values((
            inbox::consumer.eq(consumer),
            inbox::event_id.eq(event_id),
            inbox::processed_at.eq(now),
        ))
        .execute_native(conn)?;
    Ok(())
}

/// Deletes entries older than `before`; only safe beyond the stream's
/// retention, when the event can no longer be redelivered.
pub fn prune(conn: &mut DbConnection, before: i64) -> QueryResult<usize> {
    diesel::delete(inbox::table.filter(inbox::processed_at.lt(before))).execute_native(conn)
}
