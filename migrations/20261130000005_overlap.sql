-- Overlap policies: runs that wait for the activity's running run, and runs not started yet.
-- Owner: orchestrator.

-- BUFFER_ONE / BUFFER_ALL: the run is recorded but waits (status PENDING) until the run before it
-- finishes; then it starts, oldest first.
ALTER TABLE runs ADD COLUMN waiting boolean NOT NULL DEFAULT false;
-- The encoded TriggerEvent of a run recorded before it started (waiting, or admitted and about to
-- start), so whoever starts it later has exactly what the fire carried.
ALTER TABLE runs ADD COLUMN trigger_event bytea;
-- The overlap policy that admitted the run ('' = runs overlap freely).
ALTER TABLE runs ADD COLUMN overlap text NOT NULL DEFAULT '';
-- When the run was admitted to start (a stuck start is resumed by the sweeper).
ALTER TABLE runs ADD COLUMN started_at timestamptz;

CREATE INDEX runs_active ON runs (activity_id, created_at) WHERE status IN ('PENDING', 'RUNNING');
