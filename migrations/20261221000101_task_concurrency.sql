-- Owner: orchestrator. Task concurrency (`tasks[].concurrency`): a task under a concurrency key is
-- recorded `held` (PENDING, not published) and handed to executors, under the key's advisory lock,
-- while fewer than its limit of the key's tasks are handed over and unfinished.
ALTER TABLE tasks
    ADD COLUMN concurrency_key   text,
    ADD COLUMN concurrency_limit integer,
    ADD COLUMN held              boolean NOT NULL DEFAULT false,
    -- Set when a held task is let through, cleared once its message is in the stream: one still
    -- set after a while was let through by an orchestrator that stopped before publishing it.
    ADD COLUMN publish_due       timestamptz;

-- The tasks a key holds back, in the order they are let through.
CREATE INDEX tasks_key_held ON tasks (concurrency_key, created_at, run_id, template, item_index)
    WHERE held AND status = 'PENDING';
-- The tasks a key has handed over that have not ended: what its limit counts.
CREATE INDEX tasks_key_busy ON tasks (concurrency_key)
    WHERE concurrency_key IS NOT NULL AND NOT held AND status IN ('PENDING', 'RUNNING', 'FAILED');
CREATE INDEX tasks_publish_due ON tasks (publish_due) WHERE publish_due IS NOT NULL;
