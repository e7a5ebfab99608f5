-- Runs waiting behind another of their activity (an overlap policy that buffers), found by
-- activity when a run finishes: the results transaction that finishes a run asks whether any
-- waits, instead of a locked look per finished run. Waiting runs are few; the index stays small.
-- Owner: orchestrator.
CREATE INDEX runs_waiting ON runs (activity_id) WHERE waiting AND status = 'PENDING';
