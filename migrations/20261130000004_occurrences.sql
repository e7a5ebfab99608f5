-- The decision ledger of schedules, pause history, and the scheduling leader's fence.
-- Owner: trigger.

-- Occurrences that did not fire, with the decision and why (fired occurrences are the fires
-- themselves). A row stands for the consecutive occurrences in (range_after, scheduled_for] of
-- the schedule at activity_version; `occurrences` counts them (NULL: not counted, too many).
CREATE TABLE occurrences (
    activity_id      uuid NOT NULL REFERENCES activities (id),
    scheduled_for    timestamptz NOT NULL,
    decision         text NOT NULL CHECK (decision IN ('SKIPPED_PAUSED', 'SKIPPED_OVERLAP',
                         'MISSED_CATCHUP_WINDOW', 'COALESCED', 'DEDUPED', 'EXCLUDED', 'BUFFERED')),
    range_after      timestamptz NOT NULL,
    occurrences      bigint,
    reason           text NOT NULL,
    -- COALESCED: the run the occurrences were folded into.
    run_id           uuid,
    activity_version integer NOT NULL,
    dst_note         text,
    decided_at       timestamptz NOT NULL,
    PRIMARY KEY (activity_id, scheduled_for, decision)
);

CREATE INDEX occurrences_range ON occurrences (activity_id, range_after);

-- The DST note of a fired occurrence (a DST rule moved, doubled or chose it).
ALTER TABLE fires ADD COLUMN dst_note text;

-- When the current (or last) pause began and ended, so decisions can say "paused".
ALTER TABLE activities ADD COLUMN paused_at timestamptz;
ALTER TABLE activities ADD COLUMN resumed_at timestamptz;
ALTER TABLE activities ADD COLUMN resume_note text NOT NULL DEFAULT '';
-- When the activity last became active (created, resumed, enabled): occurrences before it were
-- missed while it was off and go to the misfire policy.
ALTER TABLE activities ADD COLUMN activated_at timestamptz;

-- The scheduling leader's fencing token: (when the lease bucket was created, the NATS KV revision
-- at which it took the lease) — ordered, so a recreated bucket starts a newer epoch. Every
-- scheduled fire checks it in its transaction, so a deposed leader can no longer write.
CREATE TABLE scheduler_fence (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    epoch       timestamptz NOT NULL,
    term        bigint NOT NULL,
    holder      text NOT NULL,
    acquired_at timestamptz NOT NULL
);
