-- Runs, task instances and task attempts.
-- Owner: orchestrator (the admin API in the trigger service reads them).

CREATE TABLE runs (
    id               uuid PRIMARY KEY,
    activity_id      uuid NOT NULL REFERENCES activities (id),
    activity_name    text NOT NULL,
    activity_version integer NOT NULL,
    event_id         uuid NOT NULL,
    source           text NOT NULL,
    dedupe_key       text NOT NULL,
    scheduled_for    timestamptz,
    fired_at         timestamptz NOT NULL,
    subject          text NOT NULL DEFAULT '',
    payload          jsonb,
    status           text NOT NULL,
    -- The resolved context, as the templates saw it.
    context          jsonb,
    -- Per template: items seen, tasks made, notes, error.
    evaluation       jsonb,
    error            text NOT NULL DEFAULT '',
    tasks_spawned    integer NOT NULL DEFAULT 0,
    tasks_succeeded  integer NOT NULL DEFAULT 0,
    -- Tasks that ended without success (dead or cancelled).
    tasks_failed     integer NOT NULL DEFAULT 0,
    -- Every task has been published; a redelivered trigger has nothing left to do.
    spawn_complete   boolean NOT NULL DEFAULT false,
    trace_id         text NOT NULL DEFAULT '',
    created_at       timestamptz NOT NULL DEFAULT now(),
    finished_at      timestamptz,
    -- When events.taskfactory.run.completed was published for this run.
    announced_at     timestamptz,
    UNIQUE (activity_id, dedupe_key)
);

CREATE INDEX runs_by_activity ON runs (activity_id, created_at DESC, id DESC);
CREATE INDEX runs_by_time ON runs (created_at DESC, id DESC);
-- Finished runs whose completion event is still to be published (a sweeper repairs them).
CREATE INDEX runs_unannounced ON runs (finished_at) WHERE announced_at IS NULL AND finished_at IS NOT NULL;

CREATE TABLE tasks (
    id               uuid PRIMARY KEY,
    run_id           uuid NOT NULL REFERENCES runs (id),
    activity_id      uuid NOT NULL,
    activity_name    text NOT NULL,
    template         text NOT NULL,
    item_index       integer NOT NULL,
    type             text NOT NULL,
    params           jsonb NOT NULL,
    -- The encoded TaskInstance, republished as is when a spawn is resumed.
    instance         bytea NOT NULL,
    status           text NOT NULL,
    attempts         integer NOT NULL DEFAULT 0,
    last_error       text NOT NULL DEFAULT '',
    output           jsonb,
    created_at       timestamptz NOT NULL,
    finished_at      timestamptz
);

CREATE INDEX tasks_by_run ON tasks (run_id, template, item_index);
CREATE INDEX tasks_by_activity ON tasks (activity_id, created_at DESC, id DESC);

-- Every result an executor reported: one row per attempt and outcome.
CREATE TABLE task_attempts (
    task_id     uuid NOT NULL REFERENCES tasks (id),
    attempt     integer NOT NULL,
    status      text NOT NULL,
    error       text NOT NULL DEFAULT '',
    output      jsonb,
    executor    text NOT NULL DEFAULT '',
    started_at  timestamptz,
    finished_at timestamptz,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (task_id, attempt, status)
);
