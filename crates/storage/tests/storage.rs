//! The shared storage layer against both real databases.

#![allow(clippy::unwrap_used)] // tests fail loudly by design

use std::collections::BTreeMap;

use gpualloc_storage::{Db, DbError, DbOptions, MIGRATIONS, inbox, lock, outbox};

async fn open(url: &str) -> Db {
    let db = Db::connect(url, DbOptions::default()).await.unwrap();
    db.migrate(&[MIGRATIONS]).await.unwrap();
    db
}

fn message(i: u32, aggregate: &str) -> outbox::OutboxMessage {
    outbox::OutboxMessage {
        event_id: format!("ev-{i}"),
        subject: "saga.allocation.requested".into(),
        payload: vec![0, 1, 2, 255, i as u8],
        headers: BTreeMap::from([("traceparent".into(), format!("00-{i}"))]),
        aggregate_id: aggregate.into(),
    }
}

async fn pending(
    db: &Db,
    origin: &'static str,
    foreign_before: i64,
    limit: i64,
) -> Vec<outbox::PendingRow> {
    db.read(move |c| Ok::<_, DbError>(outbox::pending(c, origin, foreign_before, limit)?))
        .await
        .unwrap()
}

fn event_ids(rows: &[outbox::PendingRow]) -> Vec<&str> {
    rows.iter().map(|r| r.event_id.as_str()).collect()
}

async fn migrations_are_idempotent(url: String) {
    let db = open(&url).await;
    // A second run (another replica starting) applies nothing and fails on
    // nothing.
    db.migrate(&[MIGRATIONS]).await.unwrap();
    let again = Db::connect(&url, DbOptions::default()).await.unwrap();
    again.migrate(&[MIGRATIONS]).await.unwrap();
}

async fn outbox_keeps_order_and_bytes(url: String) {
    let db = open(&url).await;
    db.write(|c| {
        outbox::append(c, "replica-a", 100, &[message(1, "x"), message(2, "x")])?;
        outbox::append(c, "replica-b", 100, &[message(3, "y")])?;
        outbox::append(c, "replica-a", 200, &[message(4, "x")])?;
        Ok::<_, DbError>(())
    })
    .await
    .unwrap();

    // Replica A sees its own rows at once, B's only once they are old
    // enough for the reconciler.
    let mine = pending(&db, "replica-a", 50, 100).await;
    assert_eq!(event_ids(&mine), ["ev-1", "ev-2", "ev-4"]);
    assert_eq!(mine[0].payload, vec![0, 1, 2, 255, 1]);
    assert_eq!(mine[1].header_map()["traceparent"], "00-2");

    let all = pending(&db, "replica-a", 150, 100).await;
    assert_eq!(event_ids(&all), ["ev-1", "ev-2", "ev-3", "ev-4"]);
    // A batch is the oldest rows first, as many as asked for (the limit is
    // written into the SQL; each size is its own prepared statement).
    for n in [1, 3, 1] {
        let batch = pending(&db, "replica-a", 150, n).await;
        assert_eq!(
            event_ids(&batch),
            ["ev-1", "ev-2", "ev-3", "ev-4"][..n as usize]
        );
    }

    let (count, oldest) = db
        .read(|c| Ok::<_, DbError>(outbox::backlog(c)?))
        .await
        .unwrap();
    assert_eq!((count, oldest), (4, Some(100)));

    let first_two = vec![all[0].id, all[1].id];
    let marked = db
        .write(move |c| Ok::<_, DbError>(outbox::mark_published(c, &first_two, 300)?))
        .await
        .unwrap();
    assert_eq!(marked, 2);
    let left = pending(&db, "replica-a", 150, 100).await;
    assert_eq!(left.len(), 2);

    // Replay after data loss at the broker: everything is pending again.
    db.write(|c| Ok::<_, DbError>(outbox::mark_all_unpublished(c)?))
        .await
        .unwrap();
    let (count, _) = db
        .read(|c| Ok::<_, DbError>(outbox::backlog(c)?))
        .await
        .unwrap();
    assert_eq!(count, 4);

    // Pruning removes only published rows older than the cut.
    let ids: Vec<i64> = all.iter().map(|r| r.id).collect();
    db.write(move |c| Ok::<_, DbError>(outbox::mark_published(c, &ids, 400)?))
        .await
        .unwrap();
    let pruned = db
        .write(|c| Ok::<_, DbError>(outbox::prune(c, 401)?))
        .await
        .unwrap();
    assert_eq!(pruned, 4);
}

async fn duplicate_event_ids_are_refused(url: String) {
    let db = open(&url).await;
    db.write(|c| Ok::<_, DbError>(outbox::append(c, "a", 1, &[message(1, "x")])?))
        .await
        .unwrap();
    let dup = db
        .write(|c| Ok::<_, DbError>(outbox::append(c, "a", 1, &[message(1, "x")])?))
        .await;
    assert!(dup.is_err(), "the same event id stored twice");
}

async fn inbox_claims_once_per_consumer(url: String) {
    let db = open(&url).await;
    let claim = |consumer: &'static str, id: &'static str| {
        let db = db.clone();
        async move {
            db.write(move |c| Ok::<_, DbError>(inbox::claim(c, consumer, id, 10)?))
                .await
                .unwrap()
        }
    };
    assert!(claim("pool", "e1").await);
    assert!(!claim("pool", "e1").await, "redelivery processed again");
    assert!(
        claim("viewer", "e1").await,
        "consumers must not share claims"
    );
    assert!(claim("pool", "e2").await);
    let pruned = db
        .write(|c| Ok::<_, DbError>(inbox::prune(c, 11)?))
        .await
        .unwrap();
    assert_eq!(pruned, 3);
}

async fn a_failed_transaction_leaves_nothing(url: String) {
    let db = open(&url).await;
    let r = db
        .write(|c| {
            outbox::append(c, "a", 1, &[message(7, "x")])?;
            inbox::claim(c, "pool", "e7", 1)?;
            Err::<(), _>(DbError::Pool("simulated failure after the writes".into()))
        })
        .await;
    assert!(r.is_err());
    let (count, _) = db
        .read(|c| Ok::<_, DbError>(outbox::backlog(c)?))
        .await
        .unwrap();
    assert_eq!(count, 0, "outbox row survived a rolled-back transaction");
    assert!(
        db.write(|c| Ok::<_, DbError>(inbox::claim(c, "pool", "e7", 1)?))
            .await
            .unwrap()
    );
}

async fn locks_serialise_concurrent_writers(url: String) {
    let db = open(&url).await;
    // Many concurrent read-modify-write transactions on a counter kept in
    // the outbox table's row count: without the lock some would interleave
    // on PostgreSQL.
    let mut tasks = Vec::new();
    for i in 0..40u32 {
        let db = db.clone();
        tasks.push(tokio::spawn(async move {
            db.write(move |c| {
                lock::acquire(c, "counter")?;
                let (n, _) = outbox::backlog(c)?;
                outbox::append(c, "a", n, &[message(1000 + i, "x")])?;
                Ok::<_, DbError>(())
            })
            .await
        }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let rows = pending(&db, "a", 0, 1000).await;
    let mut seen: Vec<i64> = rows.iter().map(|r| r.created_at).collect();
    seen.sort();
    assert_eq!(
        seen,
        (0..40).collect::<Vec<i64>>(),
        "two writers saw the same count"
    );
}

/// Caches of what a process wrote compare the write generation: it moves
/// once a write has ended, committed or not, and reads leave it alone.
async fn the_write_generation_moves_after_each_write(url: String) {
    let db = open(&url).await;
    let g0 = db.write_generation();
    db.read(|c| Ok::<_, DbError>(outbox::backlog(c)?))
        .await
        .unwrap();
    assert_eq!(db.write_generation(), g0, "a read is not a write");
    db.write(|c| {
        outbox::append(c, "a", 1, &[message(1, "x")])?;
        Ok::<_, DbError>(())
    })
    .await
    .unwrap();
    let g1 = db.write_generation();
    assert!(g1 > g0, "visible before the writer hears back");
    let failed = db
        .write(|_| Err::<(), _>(DbError::Pool("refused".into())))
        .await;
    assert!(failed.is_err());
    assert!(db.write_generation() > g1);
}

/// A write that panics fails its caller; the writer goes on, and the next
/// write does not find the panicked one's transaction open.
async fn a_panicking_write_fails_alone(url: String) {
    let db = open(&url).await;
    let panicked = db
        .write(|c| {
            outbox::append(c, "a", 1, &[message(1, "x")])?;
            if std::hint::black_box(true) {
                panic!("a bug in a write");
            }
            Ok::<_, DbError>(())
        })
        .await;
    assert!(panicked.is_err());
    db.write(|c| Ok::<_, DbError>(outbox::append(c, "a", 2, &[message(2, "x")])?))
        .await
        .unwrap();
    let rows = pending(&db, "a", 0, 100).await;
    assert_eq!(
        event_ids(&rows),
        ["ev-2"],
        "the panicked write was committed"
    );
}

async fn short_pending(db: &Db) -> Result<Vec<outbox::PendingRow>, DbError> {
    db.read_short(|c| Ok::<_, DbError>(outbox::pending(c, "a", 0, 100)?))
        .await
}

/// A short read (run on the calling task on SQLite) sees what committed,
/// and one that panics fails its caller alone: the reads after it, more
/// than the pool has connections, still answer.
async fn short_reads_see_commits_and_survive_a_panic(url: String) {
    let db = open(&url).await;
    db.write(|c| Ok::<_, DbError>(outbox::append(c, "a", 1, &[message(1, "x")])?))
        .await
        .unwrap();
    assert_eq!(event_ids(&short_pending(&db).await.unwrap()), ["ev-1"]);
    let panicked = db
        .read_short(|c| {
            let rows = outbox::pending(c, "a", 0, 100)?;
            if std::hint::black_box(true) {
                panic!("a bug in a read");
            }
            Ok::<_, DbError>(rows)
        })
        .await;
    assert!(panicked.is_err());
    for i in 2..40 {
        db.write(move |c| Ok::<_, DbError>(outbox::append(c, "a", 1, &[message(i, "x")])?))
            .await
            .unwrap();
        let rows = short_pending(&db).await.unwrap();
        assert_eq!(rows.len(), i as usize, "a short read missed a commit");
    }
    assert_eq!(pending(&db, "a", 0, 100).await.len(), 39);
}

gpualloc_testkit::backend_tests!(
    short_reads_see_commits_and_survive_a_panic,
    a_panicking_write_fails_alone,
    the_write_generation_moves_after_each_write,
    migrations_are_idempotent,
    outbox_keeps_order_and_bytes,
    duplicate_event_ids_are_refused,
    inbox_claims_once_per_consumer,
    a_failed_transaction_leaves_nothing,
    locks_serialise_concurrent_writers,
);
