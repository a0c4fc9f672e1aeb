-- Rows that keep failing to publish (an event over the broker's maximum
-- payload, a message the stream refuses) are set aside after a few
-- attempts instead of blocking every row behind them; an operator lists
-- and requeues them (`gpualloc-<service> outbox`).
ALTER TABLE outbox ADD COLUMN attempts INTEGER NOT NULL DEFAULT 0;
ALTER TABLE outbox ADD COLUMN last_error TEXT;
ALTER TABLE outbox ADD COLUMN poisoned_at BIGINT;
