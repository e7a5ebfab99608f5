-- Flow control's throttle (flow.throttle): runs of one key start at most `limit` per `period`,
-- `burst` at once, delayed and never dropped. A throttled run waits (`waiting`, `throttled`)
-- until its key's budget lets it through; under a concurrency key too, it then waits for room
-- there (`throttled` false, `waiting` still true). `throttle_key` stays for the record.
-- `throttles` holds each key's generic cell rate state: its theoretical arrival time (`tat`),
-- the interval and burst of the latest admission, and when its next waiting run may start
-- (`due_at`, NULL when none waits), which the orchestrators' throttle timer polls. A row whose
-- `tat` has passed and whose `due_at` is NULL is idle, and deleted. Owner: orchestrator.
-- Waiting runs of one priority start in the order their events reached the stream
-- (`arrival_ns`, ns since the epoch; without an event: when scheduled, else fired), which a
-- trigger handling events concurrently does not keep in `fired_at`. The runs waiting now take
-- their fire time.
ALTER TABLE runs
    ADD COLUMN throttle_key text,
    ADD COLUMN throttled boolean NOT NULL DEFAULT false,
    ADD COLUMN arrival_ns bigint;
UPDATE runs SET arrival_ns = (extract(epoch FROM fired_at) * 1000000)::bigint * 1000
    WHERE waiting AND status = 'PENDING';
CREATE INDEX runs_throttled ON runs (activity_id, throttle_key, priority DESC, arrival_ns, id)
    WHERE throttled AND status = 'PENDING';
-- The waiting runs' index leaves out the runs a throttle holds (they wait for their budget, in
-- runs_throttled, before they wait for room).
DROP INDEX runs_waiting;
CREATE INDEX runs_waiting ON runs (activity_id, flow_key, priority DESC, arrival_ns, id)
    WHERE waiting AND NOT throttled AND status = 'PENDING';
CREATE TABLE throttles (
    activity_id uuid NOT NULL,
    key text NOT NULL,
    tat timestamptz NOT NULL,
    interval_ns bigint NOT NULL,
    burst integer NOT NULL,
    due_at timestamptz,
    PRIMARY KEY (activity_id, key)
);
CREATE INDEX throttles_due ON throttles (due_at) WHERE due_at IS NOT NULL;
