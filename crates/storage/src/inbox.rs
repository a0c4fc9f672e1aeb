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
    let seen: i64 = inbox::table
        .filter(inbox::consumer.eq(consumer))
        .filter(inbox::event_id.eq(event_id))
        .count()
        .get_result_native(conn)?;
    if seen > 0 {
        return Ok(false);
    }
    diesel::insert_into(inbox::table)
        .values((
            inbox::consumer.eq(consumer),
            inbox::event_id.eq(event_id),
            inbox::processed_at.eq(now),
        ))
        .execute_native(conn)?;
    Ok(true)
}

/// Deletes entries older than `before`; only safe beyond the stream's
/// retention, when the event can no longer be redelivered.
pub fn prune(conn: &mut DbConnection, before: i64) -> QueryResult<usize> {
    diesel::delete(inbox::table.filter(inbox::processed_at.lt(before))).execute_native(conn)
}
