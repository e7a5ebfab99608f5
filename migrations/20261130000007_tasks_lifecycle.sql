-- Human tasks, cancellation and redrives.
-- Owner: orchestrator.

-- A human task (`WAITING`) that is not completed by then dies ("deadline passed").
ALTER TABLE tasks ADD COLUMN deadline timestamptz;
-- How many times RetryTask redrove the task (each redrive is a new attempt series).
ALTER TABLE tasks ADD COLUMN redrives integer NOT NULL DEFAULT 0;

CREATE INDEX tasks_waiting_deadline ON tasks (deadline) WHERE status = 'WAITING';
