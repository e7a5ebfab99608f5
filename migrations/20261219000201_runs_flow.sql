-- Flow control's concurrency (flow.concurrency): a run's key, the limit it was fired under, and
-- its priority. At most `flow_limit` runs of one key are admitted (PENDING and not waiting, or
-- RUNNING) at once; the others wait (`waiting`), and the highest priority, then the earliest
-- fire, starts first. Runs without flow control keep flow_key NULL (overlap policies).
-- The waiting runs' index now also finds those of one key, in the order they start; the running
-- runs of a key are counted by the second. (Not built concurrently: see runs_waiting's first
-- migration.) Owner: orchestrator.
ALTER TABLE runs
    ADD COLUMN flow_key text,
    ADD COLUMN flow_limit integer,
    ADD COLUMN priority bigint NOT NULL DEFAULT 0;
DROP INDEX runs_waiting;
CREATE INDEX runs_waiting ON runs (activity_id, flow_key, priority DESC, fired_at, id)
    WHERE waiting AND status = 'PENDING';
CREATE INDEX runs_flow_admitted ON runs (activity_id, flow_key)
    WHERE flow_key IS NOT NULL AND NOT waiting AND status IN ('PENDING', 'RUNNING');
