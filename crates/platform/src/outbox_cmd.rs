//! `gpualloc-<service> outbox`: what an operator does about outbox rows that
//! were set aside after failing to publish (an event larger than the broker
//! or the stream takes): list them, and requeue them once the limit is
//! raised. Every service has the command; it works on that service's
//! database, while the service runs.

use gpualloc_storage::{Db, DbError, outbox};

use crate::CommonConfig;

/// Options of the `outbox` command.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct OutboxArgs {
    /// Put these rows (by id) back in line.
    #[arg(long, value_delimiter = ',')]
    pub requeue: Vec<i64>,
    /// Put every row that was set aside back in line.
    #[arg(long, conflicts_with = "requeue")]
    pub requeue_all: bool,
    /// Rows to list at most.
    #[arg(long, default_value_t = 100)]
    pub limit: i64,
}

/// Rows set aside, for people.
pub async fn list(db: &Db, limit: i64) -> anyhow::Result<Vec<outbox::PoisonedRow>> {
    Ok(db
        .read(move |c| Ok::<_, DbError>(outbox::poisoned(c, limit.clamp(1, 10_000))?))
        .await?)
}

/// Requeues `ids` (all with `ids` empty); returns how many.
pub async fn requeue(db: &Db, ids: Vec<i64>) -> anyhow::Result<usize> {
    Ok(db
        .write(move |c| Ok::<_, DbError>(outbox::requeue(c, &ids)?))
        .await?)
}

/// Runs the command against the service's database; returns what to print.
pub async fn run(common: &CommonConfig, args: &OutboxArgs) -> anyhow::Result<String> {
    let db = Db::connect(&common.database_url, common.db_options()).await?;
    let mut out = String::new();
    if args.requeue_all || !args.requeue.is_empty() {
        let n = requeue(&db, args.requeue.clone()).await?;
        out.push_str(&format!(
            "requeued {n} row(s); the relay publishes them now\n"
        ));
    }
    let rows = list(&db, args.limit).await?;
    if rows.is_empty() {
        out.push_str("no outbox rows are set aside\n");
    }
    for r in rows {
        out.push_str(&format!(
            "{id}\t{subject}\t{aggregate}\tevent {event}\t{attempts} attempts\t{error}\n",
            id = r.id,
            subject = r.subject,
            aggregate = r.aggregate_id,
            event = r.event_id,
            attempts = r.attempts,
            error = r.last_error.unwrap_or_default(),
        ));
    }
    Ok(out)
}
