-- Read models, built only from events. Rebuilding drops and replays them.

-- The latest known state of each allocation (highest version wins).
CREATE TABLE allocation_views (
    allocation_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    state TEXT NOT NULL,
    version BIGINT NOT NULL,
    create_time BIGINT NOT NULL,
    update_time BIGINT NOT NULL,
    -- Last hold-queue position the pool reported.
    hold_position BIGINT NOT NULL,
    -- The encoded gpualloc.allocation.v1.Allocation of that version.
    snapshot {{BLOB}} NOT NULL,
    project_time BIGINT NOT NULL
);
-- Newest-first listing, per tenant and overall (keyset pagination).
CREATE INDEX allocation_views_tenant ON allocation_views (tenant, create_time, allocation_id);
CREATE INDEX allocation_views_time ON allocation_views (create_time, allocation_id);

-- Every state change: the audit trail. One row per allocation version.
CREATE TABLE allocation_history (
    allocation_id TEXT NOT NULL,
    version BIGINT NOT NULL,
    event_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    previous_state TEXT NOT NULL,
    state TEXT NOT NULL,
    reason TEXT NOT NULL,
    change_time BIGINT NOT NULL,
    PRIMARY KEY (allocation_id, version)
);

-- Tenants' quotas as announced by the resource pool.
CREATE TABLE tenant_quota_views (
    tenant TEXT PRIMARY KEY,
    limits TEXT NOT NULL,
    version BIGINT NOT NULL
);
