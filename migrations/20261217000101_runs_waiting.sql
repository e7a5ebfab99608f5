-- Runs waiting behind another of their activity (an overlap policy that buffers), found by
-- activity when a run finishes: the results transaction that finishes a run asks whether any
-- waits, instead of a locked look per finished run. Waiting runs are few; the index stays small.
-- (Not built concurrently: the services' migrators wait on one another's lock, and a concurrent
-- build waits for their transactions. Its build blocks writes to `runs` while it scans it.)
-- Owner: orchestrator.
CREATE INDEX runs_waiting ON runs (activity_id) WHERE waiting AND status = 'PENDING';
