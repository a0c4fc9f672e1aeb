-- The source of truth for allocation state.
CREATE TABLE allocations (
    allocation_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    -- JSON of the Resources; gpu_model is filled in when granted.
    resources TEXT NOT NULL,
    pool_id TEXT,
    priority INTEGER NOT NULL,
    -- Idempotency key and a canonical form of the parameters it was used
    -- with (a reuse with other parameters is refused).
    request_id TEXT,
    fingerprint TEXT NOT NULL,
    labels TEXT NOT NULL,
    lease_micros BIGINT,
    -- Incremented on every transition; events carry it.
    version BIGINT NOT NULL,
    -- Highest reservation version applied from the pool: older pool
    -- events are stale and ignored.
    pool_version BIGINT NOT NULL,
    approved_time BIGINT,
    create_time BIGINT NOT NULL,
    update_time BIGINT NOT NULL,
    expire_time BIGINT,
    -- Reconciler: how often this saga step was re-driven, and when it may
    -- be re-driven next (backing off, so a pool that is down for long is
    -- not flooded).
    redrives INTEGER NOT NULL DEFAULT 0,
    redrive_time BIGINT,
    CONSTRAINT allocations_state CHECK (state IN (
        'PENDING', 'AWAITING_APPROVAL', 'HELD', 'ALLOCATED',
        'REJECTED', 'CANCELLING', 'CANCELLED', 'EXPIRED'))
);
CREATE UNIQUE INDEX allocations_request_id ON allocations (tenant, request_id) WHERE request_id IS NOT NULL;
-- The reconciler looks for sagas waiting on the pool for too long.
CREATE INDEX allocations_waiting ON allocations (update_time) WHERE state IN ('PENDING', 'CANCELLING');

-- Administrators' decisions on allocations above a tenant's threshold.
CREATE TABLE approvals (
    allocation_id TEXT PRIMARY KEY REFERENCES allocations (allocation_id),
    decision TEXT NOT NULL,
    reason TEXT NOT NULL,
    decided_by TEXT NOT NULL,
    decide_time BIGINT NOT NULL,
    CONSTRAINT approvals_decision CHECK (decision IN ('APPROVED', 'REJECTED'))
);
