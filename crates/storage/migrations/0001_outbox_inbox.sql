-- The transactional outbox: every state change writes the events it emits
-- here in the same transaction; the relay publishes them to JetStream
-- (Nats-Msg-Id = event_id) and only then sets published_at.
CREATE TABLE outbox (
    id {{ID}},
    event_id TEXT NOT NULL UNIQUE,
    -- Relative to the configured subject prefix.
    subject TEXT NOT NULL,
    payload {{BLOB}} NOT NULL,
    -- JSON object of NATS headers (trace context, request id).
    headers TEXT NOT NULL,
    aggregate_id TEXT NOT NULL,
    -- The replica that wrote the row publishes it at once; others only
    -- after a grace period (the reconciler), so replicas rarely race.
    origin TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    published_at BIGINT
);
CREATE INDEX outbox_unpublished ON outbox (id) WHERE published_at IS NULL;
CREATE INDEX outbox_published_at ON outbox (published_at) WHERE published_at IS NOT NULL;

-- Idempotent consumers: an event's effect and its inbox row commit together,
-- so a redelivered event finds its row and is skipped.
CREATE TABLE inbox (
    consumer TEXT NOT NULL,
    event_id TEXT NOT NULL,
    processed_at BIGINT NOT NULL,
    PRIMARY KEY (consumer, event_id)
);
CREATE INDEX inbox_processed_at ON inbox (processed_at);

-- Named rows that transactions update first to serialise one kind of
-- decision across replicas (a portable stand-in for advisory locks).
CREATE TABLE saga_locks (
    name TEXT PRIMARY KEY,
    counter BIGINT NOT NULL
);
