//! `gpualloc-viewer rebuild`: drops the read models and projects them again
//! from the whole stream, with the same code the live consumer runs. Stop
//! the viewer's replicas first (the durable consumer keeps its position, so
//! they resume with new events afterwards). Notifications are not sent
//! again: deliveries are keyed by event id and kept.

use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use futures::StreamExt;
use gpualloc_domain::time::now_micros;
use gpualloc_platform::CommonConfig;
use gpualloc_saga::{Bus, decode};
use gpualloc_storage::{Db, DbError};

use crate::{Error, MIGRATIONS, projection, schema};

/// Events applied per transaction.
const BATCH: usize = 500;

/// What a rebuild did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Rebuilt {
    /// Stream messages read.
    pub messages: u64,
    /// Of those, undecodable and skipped.
    pub skipped: u64,
}

pub async fn rebuild(common: &CommonConfig) -> anyhow::Result<Rebuilt> {
    if common.create_database {
        Db::create_database_if_missing(&common.database_url).await?;
    }
    let db = Db::connect(&common.database_url, common.db_options()).await?;
    db.migrate(&[gpualloc_storage::MIGRATIONS, MIGRATIONS])
        .await
        .context("migrating the viewer's database")?;
    let bus = Bus::connect(common.bus(), "viewer-rebuild", |_| {}).await?;
    let stream = tokio::time::timeout(Duration::from_secs(30), bus.provision())
        .await
        .map_err(|_| anyhow::anyhow!("NATS did not answer within 30s"))??;
    let mut stream = stream;
    let last = stream.info().await?.state.last_sequence;

    db.write(|c| {
        use diesel::RunQueryDsl;
        diesel::delete(schema::allocation_views::table).execute(c)?;
        diesel::delete(schema::allocation_history::table).execute(c)?;
        diesel::delete(schema::tenant_quota_views::table).execute(c)?;
        Ok::<_, DbError>(())
    })
    .await
    .context("dropping the read models")?;
    tracing::info!(
        last_sequence = last,
        "read models dropped; replaying the stream"
    );

    let mut out = Rebuilt::default();
    if last == 0 {
        return Ok(out);
    }
    let consumer = stream
        .create_consumer(pull::OrderedConfig {
            filter_subject: bus.subject(">"),
            deliver_policy: DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .map_err(|e| anyhow::Error::from_boxed(Box::new(e)))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| anyhow::Error::from_boxed(Box::new(e)))?;
    let mut batch = Vec::with_capacity(BATCH);
    let mut done = false;
    while !done {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next()).await;
        let message = match next {
            Ok(Some(m)) => m.map_err(|e| anyhow::Error::from_boxed(Box::new(e)))?,
            // The stream ended before `last` (messages purged): done.
            Ok(None) | Err(_) => break,
        };
        let seq = message.info().map(|i| i.stream_sequence).unwrap_or(last);
        out.messages += 1;
        match decode(&message.payload) {
            Ok(event) => batch.push(event),
            Err(e) => {
                out.skipped += 1;
                tracing::warn!(seq, error = %e, "skipping an undecodable message");
            }
        }
        done = seq >= last;
        if batch.len() >= BATCH || done {
            let events = std::mem::take(&mut batch);
            db.write(move |c| {
                let now = now_micros();
                for e in &events {
                    if projection::valid_for_rebuild(c, e)? {
                        projection::project(c, now, e, None)?;
                    }
                }
                Ok::<_, Error>(())
            })
            .await
            .with_context(|| format!("projecting up to stream sequence {seq}"))?;
        }
    }
    if !batch.is_empty() {
        db.write(move |c| {
            let now = now_micros();
            for e in &batch {
                if projection::valid_for_rebuild(c, e)? {
                    projection::project(c, now, e, None)?;
                }
            }
            Ok::<_, Error>(())
        })
        .await?;
    }
    tracing::info!(
        messages = out.messages,
        skipped = out.skipped,
        "rebuild done"
    );
    Ok(out)
}
