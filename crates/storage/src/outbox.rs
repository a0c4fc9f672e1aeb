//! The transactional outbox. Writers call [`append`] inside the transaction
//! that changes state; the relay (in `gpualloc-saga`) reads [`pending`] rows,
//! publishes them and calls [`mark_published`] after JetStream's ack.

use std::collections::BTreeMap;

use diesel::prelude::*;

use crate::{DbConnection, LiteralLimitExt, Native};

diesel::table! {
    outbox (id) {
        id -> BigInt,
        event_id -> Text,
        subject -> Text,
        payload -> Binary,
        headers -> Text,
        aggregate_id -> Text,
        origin -> Text,
        created_at -> BigInt,
        published_at -> Nullable<BigInt>,
        attempts -> Integer,
        last_error -> Nullable<Text>,
        poisoned_at -> Nullable<BigInt>,
    }
}

/// Publish attempts that failed because of the row itself after which it
/// is set aside.
pub const MAX_ATTEMPTS: i32 = 5;

/// A row set aside, as an operator sees it.
#[derive(Clone, Debug, Queryable, Selectable)]
#[diesel(table_name = outbox)]
pub struct PoisonedRow {
    pub id: i64,
    pub event_id: String,
    pub subject: String,
    pub aggregate_id: String,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub poisoned_at: Option<i64>,
}

/// An event to publish.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboxMessage {
    pub event_id: String,
    /// Relative to the subject prefix, e.g. `saga.allocation.requested`.
    pub subject: String,
    pub payload: Vec<u8>,
    /// NATS headers to send along (trace context, request id).
    pub headers: BTreeMap<String, String>,
    pub aggregate_id: String,
}

/// A stored, not yet published event.
#[derive(Clone, Debug, Queryable, Selectable)]
#[diesel(table_name = outbox)]
pub struct PendingRow {
    pub id: i64,
    pub event_id: String,
    pub subject: String,
    pub payload: Vec<u8>,
    pub headers: String,
    pub created_at: i64,
}

impl PendingRow {
    pub fn header_map(&self) -> BTreeMap<String, String> {
        serde_json::from_str(&self.headers).unwrap_or_default()
    }
}

#[derive(Insertable)]
#[diesel(table_name = outbox)]
struct NewRow<'a> {
    event_id: &'a str,
    subject: &'a str,
    payload: &'a Vec<u8>,
    headers: String,
    aggregate_id: &'a str,
    origin: &'a str,
    created_at: i64,
}

/// Stores `messages` in the caller's transaction, in order.
pub fn append(
    conn: &mut DbConnection,
    origin: &str,
    now: i64,
    messages: &[OutboxMessage],
) -> QueryResult<()> {
    for m in messages {
        diesel::insert_into(outbox::table)
            .values(NewRow {
                event_id: &m.event_id,
                subject: &m.subject,
                payload: &m.payload,
                headers: serde_json::to_string(&m.headers).unwrap_or_else(|_| "{}".into()),
                aggregate_id: &m.aggregate_id,
                origin,
                created_at: now,
            })
            .execute_native(conn)?;
    }
    Ok(())
}

/// Unpublished rows in commit order: all of `origin`'s, and other replicas'
/// once they are older than `foreign_before` (their writer may have died).
pub fn pending(
    conn: &mut DbConnection,
    origin: &str,
    foreign_before: i64,
    limit: i64,
) -> QueryResult<Vec<PendingRow>> {
    let limit = u32::try_from(limit).unwrap_or(u32::MAX);
    crate::native!(conn, |c| outbox::table
        .filter(outbox::published_at.is_null())
        .filter(outbox::poisoned_at.is_null())
        .filter(
            outbox::origin
                .eq(origin)
                .or(outbox::created_at.lt(foreign_before)),
        )
        .order(outbox::id)
        .select(PendingRow::as_select())
        .limit_literal(limit)
        .load(c))
}

/// Marks rows published (after JetStream acknowledged them).
pub fn mark_published(conn: &mut DbConnection, ids: &[i64], now: i64) -> QueryResult<usize> {
    if ids.is_empty() {
        return Ok(0);
    }
    diesel::update(outbox::table.filter(outbox::id.eq_any(ids)))
        .filter(outbox::published_at.is_null())
        .set(outbox::published_at.eq(now))
        .execute_native(conn)
}

/// Unpublished rows and the creation time of the oldest, for metrics
/// (rows set aside are counted by [`poisoned_count`]).
pub fn backlog(conn: &mut DbConnection) -> QueryResult<(i64, Option<i64>)> {
    let count = outbox::table
        .filter(outbox::published_at.is_null())
        .filter(outbox::poisoned_at.is_null())
        .count()
        .get_result_native(conn)?;
    let oldest = outbox::table
        .filter(outbox::published_at.is_null())
        .filter(outbox::poisoned_at.is_null())
        .select(diesel::dsl::min(outbox::created_at))
        .get_result_native(conn)?;
    Ok((count, oldest))
}

/// Which of `aggregate_ids` have rows still waiting to be published (set
/// aside rows excepted): their sagas are not stuck downstream, their
/// events have not left yet.
pub fn unpublished_among(
    conn: &mut DbConnection,
    aggregate_ids: &[String],
) -> QueryResult<std::collections::BTreeSet<String>> {
    if aggregate_ids.is_empty() {
        return Ok(Default::default());
    }
    let found: Vec<String> = outbox::table
        .filter(outbox::published_at.is_null())
        .filter(outbox::poisoned_at.is_null())
        .filter(outbox::aggregate_id.eq_any(aggregate_ids))
        .select(outbox::aggregate_id)
        .distinct()
        .load_native(conn)?;
    Ok(found.into_iter().collect())
}

/// Rows set aside and not published.
pub fn poisoned_count(conn: &mut DbConnection) -> QueryResult<i64> {
    outbox::table
        .filter(outbox::published_at.is_null())
        .filter(outbox::poisoned_at.is_not_null())
        .count()
        .get_result_native(conn)
}

/// Counts a failed publish against row `id`, because of the row itself;
/// sets it aside at [`MAX_ATTEMPTS`]. Returns whether it was set aside.
pub fn record_failure(
    conn: &mut DbConnection,
    id: i64,
    error: &str,
    now: i64,
) -> QueryResult<bool> {
    let error: String = error.chars().take(500).collect();
    diesel::update(outbox::table.find(id))
        .set((
            outbox::attempts.eq(outbox::attempts + 1),
            outbox::last_error.eq(&error),
        ))
        .execute_native(conn)?;
    let poisoned = diesel::update(
        outbox::table
            .find(id)
            .filter(outbox::attempts.ge(MAX_ATTEMPTS))
            .filter(outbox::poisoned_at.is_null()),
    )
    .set(outbox::poisoned_at.eq(now))
    .execute_native(conn)?;
    Ok(poisoned > 0)
}

/// Rows set aside, oldest first.
pub fn poisoned(conn: &mut DbConnection, limit: i64) -> QueryResult<Vec<PoisonedRow>> {
    outbox::table
        .filter(outbox::published_at.is_null())
        .filter(outbox::poisoned_at.is_not_null())
        .order(outbox::id)
        .select(PoisonedRow::as_select())
        .limit(limit)
        .load(conn)
}

/// Puts rows set aside back in line (all of them with `ids` empty): after
/// the broker's limit was raised, or a fix was deployed.
pub fn requeue(conn: &mut DbConnection, ids: &[i64]) -> QueryResult<usize> {
    let reset = (outbox::poisoned_at.eq(None::<i64>), outbox::attempts.eq(0));
    if ids.is_empty() {
        diesel::update(outbox::table.filter(outbox::poisoned_at.is_not_null()))
            .set(reset)
            .execute_native(conn)
    } else {
        diesel::update(
            outbox::table
                .filter(outbox::poisoned_at.is_not_null())
                .filter(outbox::id.eq_any(ids)),
        )
        .set(reset)
        .execute_native(conn)
    }
}

/// Deletes rows published before `before`; they only served replays.
pub fn prune(conn: &mut DbConnection, before: i64) -> QueryResult<usize> {
    diesel::delete(outbox::table.filter(outbox::published_at.lt(before))).execute_native(conn)
}

/// Marks every row unpublished again: an operator's replay after the
/// broker lost data. Consumers' inboxes make the replay harmless.
pub fn mark_all_unpublished(conn: &mut DbConnection) -> QueryResult<usize> {
    diesel::update(outbox::table.filter(outbox::published_at.is_not_null()))
        .set(outbox::published_at.eq(None::<i64>))
        .execute_native(conn)
}
