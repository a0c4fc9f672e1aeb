-- Watchers, usage reports and notifications.
--
-- The history gains each version's full snapshot and the time this viewer
-- projected it. Old rows have neither, so the history is recreated: after
-- upgrading, run `gpualloc-viewer rebuild` to fill it from the stream.
DROP TABLE allocation_history;
CREATE TABLE allocation_history (
    allocation_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    previous_state TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    change_time BIGINT NOT NULL,
    -- The encoded gpualloc.allocation.v1.Allocation of this version: what a
    -- watcher is sent, and what the usage report bills.
    snapshot {{BLOB}} NOT NULL,
    -- When this viewer projected it: watchers follow the table by it.
    project_time BIGINT NOT NULL,
    PRIMARY KEY (allocation_id, version)
);
CREATE INDEX allocation_history_watch ON allocation_history (tenant, project_time);
CREATE INDEX allocation_history_projected ON allocation_history (project_time);
-- The usage report reads a tenant's changes by time.
CREATE INDEX allocation_history_usage ON allocation_history (tenant, change_time);

-- When an allocated lease ends (microseconds), for the expiry warning.
ALTER TABLE allocation_views ADD COLUMN expire_time BIGINT;
CREATE INDEX allocation_views_expiring ON allocation_views (state, expire_time);

-- Notifications to deliver, one row per (notification, channel). Not a
-- read model: a rebuild keeps it, so nothing is sent twice.
CREATE TABLE notifications (
    id {{ID}},
    -- The event id (or `lease:{allocation}:{expire_time}` for warnings).
    dedupe_key TEXT NOT NULL,
    channel TEXT NOT NULL,
    tenant TEXT NOT NULL,
    allocation_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    -- The channel-independent notification as JSON.
    body TEXT NOT NULL,
    -- PENDING, DELIVERED or PARKED.
    status TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    next_attempt BIGINT NOT NULL,
    last_error TEXT NOT NULL,
    create_time BIGINT NOT NULL,
    deliver_time BIGINT,
    UNIQUE (dedupe_key, channel)
);
CREATE INDEX notifications_due ON notifications (status, next_attempt);
