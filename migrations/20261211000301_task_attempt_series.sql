-- What a result is checked against: the task's current attempt series.
-- Owner: orchestrator.

-- Attempts before the current series: 0, or the attempts when RetryTask last redrove the task.
-- Results of an earlier series only join the attempt history.
ALTER TABLE tasks ADD COLUMN attempt_base integer NOT NULL DEFAULT 0;
-- The task's effective retry.maxAttempts: an attempt number past attempt_base + max_attempts
-- (and the redelivery allowance) was never handed out, and its result is refused. NULL for tasks
-- recorded before it was kept: their attempt numbers are not bounded.
ALTER TABLE tasks ADD COLUMN max_attempts integer;
