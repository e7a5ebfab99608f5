-- Every execution start is recorded: an executor reports RUNNING before it runs a task, with an id
-- of that execution, and each start is a row of its own, even when two share an attempt number
-- (a recreated consumer counts deliveries from 1 again) or their results were lost to a crash.
-- Owner: orchestrator.
ALTER TABLE task_attempts ADD COLUMN execution text NOT NULL DEFAULT '';
ALTER TABLE task_attempts DROP CONSTRAINT task_attempts_pkey;
ALTER TABLE task_attempts ADD PRIMARY KEY (task_id, attempt, status, execution);
