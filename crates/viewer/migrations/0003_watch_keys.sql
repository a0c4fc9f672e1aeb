-- Watchers poll the keys of recent changes first and read whole rows (with
-- their snapshots) only for versions they have not sent yet. With the keys
-- in the index that first read never touches the table.
DROP INDEX allocation_history_watch;
DROP INDEX allocation_history_projected;
CREATE INDEX allocation_history_watch ON allocation_history (tenant, project_time, allocation_id, version);
CREATE INDEX allocation_history_projected ON allocation_history (project_time, allocation_id, version);
