-- Why each event did or did not make a run: one decision per event and activity it reached
-- (FIRED, DEDUPED, FILTERED, FILTER_ERROR, KEY_ERROR, PAUSED, REJECTED, RATE_LIMITED), written in the
-- transaction that records the event's fire, or by the decisions writer for an event that makes
-- none. An event is its stream sequence and publish instant (a stream declared again starts its
-- sequence over), so a redelivered event finds its decision made and adds none.
-- No foreign key to activities: the decisions of a deleted activity stay readable, and a row
-- costs no lookup on the hot path. Owner: trigger.
CREATE TABLE event_decisions (
    activity_id      uuid NOT NULL,
    activity_version integer NOT NULL,
    stream_sequence  bigint NOT NULL,
    -- Nanoseconds since the epoch at which the stream took the event.
    stream_published bigint NOT NULL,
    msg_id           text,
    subject          text NOT NULL,
    -- The key that names the event's fire (its dedupeKey rendered, else the Nats-Msg-Id, else
    -- seq:<sequence>:<published>), where it could be computed; else the Nats-Msg-Id or sequence.
    event_key        text NOT NULL,
    decision         text NOT NULL,
    -- RATE_LIMITED: the value of the rate limit's key.
    flow_key         text,
    reason           text NOT NULL DEFAULT '',
    -- FIRED and DEDUPED: the run the key names.
    run_id           uuid,
    decided_at       timestamptz NOT NULL,
    -- Also the order an activity's decisions are listed in (newest event first, read backwards).
    PRIMARY KEY (activity_id, stream_published, stream_sequence)
);

-- Every activity's decisions, newest event first: by the instant the stream took it.
CREATE INDEX event_decisions_time ON event_decisions (stream_published DESC);
CREATE INDEX event_decisions_key ON event_decisions (event_key);

-- Rate limits (flow.rateLimit), one row per activity and key: the generic cell rate's theoretical
-- arrival time. A key whose time has passed has its whole budget again, as if it had no row: such
-- rows are deleted by the trigger's pruner, so the table holds only keys used within a period.
CREATE TABLE rate_limits (
    activity_id uuid NOT NULL,
    key         text NOT NULL,
    tat         timestamptz NOT NULL,
    PRIMARY KEY (activity_id, key)
);

CREATE INDEX rate_limits_tat ON rate_limits (tat);
