-- When FACTORY_TASKS was deleted and declared again, the tasks it held are published again.
-- Owner: orchestrator.

-- The creation time of each task stream the orchestrator last published the tasks still to be
-- run into: a stream created at another time was deleted and declared again (by any service).
CREATE TABLE task_stream_epochs (
    stream  text PRIMARY KEY,
    created timestamptz NOT NULL
);

-- Tasks still to be run (their runs are read through the join): read page by page across runs.
CREATE INDEX tasks_to_run ON tasks (id) WHERE status IN ('PENDING', 'FAILED');
