-- A name for people, shown next to the id (issue 14); empty for
-- allocations made before names existed.
ALTER TABLE allocations ADD COLUMN display_name TEXT NOT NULL DEFAULT '';
