-- The fire ledger (an outbox of TriggerEvents), schedule watermarks, and rejected events.
-- Owner: trigger.

CREATE TABLE fires (
    id               uuid PRIMARY KEY,
    activity_id      uuid NOT NULL REFERENCES activities (id),
    activity_name    text NOT NULL,
    activity_version integer NOT NULL,
    source           text NOT NULL,
    -- Schedules: scheduled_for in RFC 3339 UTC; events: the Nats-Msg-Id, the stream sequence or
    -- the spec's dedupeKey; manual: the idempotency key.
    dedupe_key       text NOT NULL,
    scheduled_for    timestamptz,
    fired_at         timestamptz NOT NULL,
    subject          text NOT NULL DEFAULT '',
    payload          jsonb,
    -- The encoded TriggerEvent, republished as is by the reconciler.
    event            bytea NOT NULL,
    published_at     timestamptz,
    -- How often the reconciler republished it because no run appeared (it backs off).
    republish_count  integer NOT NULL DEFAULT 0,
    -- When the reconciler saw the fire's run: from then on it is never looked at again.
    confirmed_at     timestamptz,
    UNIQUE (activity_id, dedupe_key)
);

CREATE INDEX fires_unpublished ON fires (fired_at) WHERE published_at IS NULL;
CREATE INDEX fires_unconfirmed ON fires (published_at) WHERE confirmed_at IS NULL;
CREATE INDEX fires_activity_time ON fires (activity_id, fired_at DESC);

CREATE TABLE schedule_state (
    activity_id uuid PRIMARY KEY REFERENCES activities (id),
    -- The newest scheduled_for that has been decided; a restart continues after it.
    watermark   timestamptz NOT NULL,
    fires       bigint NOT NULL DEFAULT 0,
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Events that could not be taken in (not JSON, too large, not an object): kept with their error.
CREATE TABLE rejected_events (
    id              bigserial PRIMARY KEY,
    subject         text NOT NULL,
    stream_sequence bigint NOT NULL,
    msg_id          text,
    error           text NOT NULL,
    size_bytes      integer NOT NULL,
    body_excerpt    bytea NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX rejected_events_time ON rejected_events (received_at DESC);
