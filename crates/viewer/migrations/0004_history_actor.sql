-- Who caused a change (the verified caller's subject) for cancels,
-- approvals and rejections; empty for the saga's own steps and for history
-- recorded before it was kept.
ALTER TABLE allocation_history ADD COLUMN actor TEXT NOT NULL DEFAULT '';
