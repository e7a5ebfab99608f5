-- A requeue into a FACTORY_TASKS declared again is claimed and resumed: one orchestrator publishes
-- a page at a time under the row's lock, and the next one goes on where it stopped.
-- Owner: orchestrator.

-- The stream (its creation time) whose requeue is under way, and the last task id published into
-- it; both NULL when none is.
ALTER TABLE task_stream_epochs ADD COLUMN requeue_of timestamptz;
ALTER TABLE task_stream_epochs ADD COLUMN requeue_after uuid;

-- When RetryTask last put the task back to PENDING (NULL: never). Its redrive publishes it; a
-- stream created before that time still needs it requeued, one created after does not.
ALTER TABLE tasks ADD COLUMN redriven_at timestamptz;
