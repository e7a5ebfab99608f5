-- Tasks left behind by a replaced FACTORY_TASKS after its requeue: one in flight when the stream
-- was deleted fails afterwards, and its next attempt's message went to the deleted stream.
-- Owner: orchestrator.

-- The creation time of the task stream the requeue last published this task into: it is
-- published into each stream at most once.
ALTER TABLE tasks ADD COLUMN requeued_for timestamptz;

-- Tasks waiting for their next attempt, looked at on every requeue look.
CREATE INDEX tasks_failed ON tasks (id) WHERE status = 'FAILED';
