CREATE TABLE pools (
    pool_id TEXT PRIMARY KEY,
    max_hold_micros BIGINT,
    version BIGINT NOT NULL,
    create_time BIGINT NOT NULL,
    update_time BIGINT NOT NULL
);

-- One counter per pool and class ("cpu_millis", "gpus.A100", "custom.SEAT").
-- The CHECK is invariant I1 for pools, enforced at every commit by the
-- database itself, whatever the code does.
CREATE TABLE pool_resources (
    pool_id TEXT NOT NULL REFERENCES pools (pool_id) ON DELETE CASCADE,
    class TEXT NOT NULL,
    capacity BIGINT NOT NULL,
    used BIGINT NOT NULL,
    PRIMARY KEY (pool_id, class),
    CONSTRAINT pool_resources_within_capacity CHECK (used >= 0 AND used <= capacity)
);

CREATE TABLE tenant_quotas (
    tenant TEXT PRIMARY KEY,
    -- JSON of the approval threshold (a Resources bundle).
    approval_above TEXT NOT NULL,
    max_hold_micros BIGINT,
    version BIGINT NOT NULL,
    update_time BIGINT NOT NULL
);

-- One counter per tenant and quota class ("gpus" counts every model).
-- charged = granted + held. The CHECK is invariant I1 for tenants.
CREATE TABLE tenant_usage (
    tenant TEXT NOT NULL REFERENCES tenant_quotas (tenant) ON DELETE CASCADE,
    class TEXT NOT NULL,
    quota_limit BIGINT NOT NULL,
    charged BIGINT NOT NULL,
    granted BIGINT NOT NULL,
    PRIMARY KEY (tenant, class),
    CONSTRAINT tenant_usage_within_quota CHECK (granted >= 0 AND charged >= granted AND charged <= quota_limit)
);

-- One row per allocation the pool has heard of. States only move forward:
-- HELD -> GRANTED -> RELEASED, HELD -> RELEASED | REJECTED. A cancel that
-- arrives before its request leaves a RELEASED row, so the late request is
-- never granted.
CREATE TABLE reservations (
    allocation_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    state TEXT NOT NULL,
    -- JSON of the requested Resources.
    demand TEXT NOT NULL,
    pool_id TEXT,
    gpu_model TEXT,
    priority INTEGER NOT NULL,
    -- The allocation's creation time: its age in the hold queue.
    request_time BIGINT NOT NULL,
    lease_micros BIGINT,
    hold_deadline BIGINT,
    expire_time BIGINT,
    reason TEXT NOT NULL,
    -- Why it ended, for programs: the RejectCause or ReleaseCause name.
    outcome TEXT,
    version BIGINT NOT NULL,
    create_time BIGINT NOT NULL,
    update_time BIGINT NOT NULL,
    CONSTRAINT reservations_state CHECK (state IN ('HELD', 'GRANTED', 'RELEASED', 'REJECTED')),
    CONSTRAINT reservations_granted_has_pool CHECK (state <> 'GRANTED' OR pool_id IS NOT NULL)
);
CREATE INDEX reservations_held ON reservations (priority, request_time) WHERE state = 'HELD';
CREATE INDEX reservations_expiring ON reservations (expire_time) WHERE state = 'GRANTED';
CREATE INDEX reservations_hold_deadline ON reservations (hold_deadline) WHERE state = 'HELD';
CREATE INDEX reservations_pool ON reservations (pool_id) WHERE state = 'GRANTED';
