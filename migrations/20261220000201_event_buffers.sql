-- Flow control's debounce and batch (flow.debounce, flow.batch): the events a key gathers until
-- its run fires. One row per activity and key with a burst or batch open (`dedupe_key`: the
-- dedupe key its fire will have, from its first event, so its run is known as each event is
-- taken), and its events (`event_buffer_items`, in the order they reached the stream; a
-- debounce that keeps only the last event holds it in `last_payload`, the latest in the stream
-- of those taken, at `last_published`/`last_sequence`). `bytes` counts the events as the run's
-- TriggerEvent carries them. `due_at` is when it
-- fires by time (the trigger's flusher polls it). A fire takes the rows away in the
-- transaction that records it. Owner: trigger.
CREATE TABLE event_buffers (
    activity_id uuid NOT NULL,
    key text NOT NULL,
    kind text NOT NULL,
    activity_version integer NOT NULL,
    activity_name text NOT NULL,
    dedupe_key text NOT NULL,
    subject text NOT NULL,
    size integer NOT NULL DEFAULT 0,
    bytes bigint NOT NULL DEFAULT 0,
    opened_at timestamptz NOT NULL,
    last_at timestamptz NOT NULL,
    due_at timestamptz NOT NULL,
    last_payload jsonb,
    last_published bigint,
    last_sequence bigint,
    PRIMARY KEY (activity_id, key)
);
CREATE INDEX event_buffers_due ON event_buffers (due_at);
CREATE TABLE event_buffer_items (
    activity_id uuid NOT NULL,
    key text NOT NULL,
    stream_published bigint NOT NULL,
    stream_sequence bigint NOT NULL,
    payload jsonb NOT NULL,
    PRIMARY KEY (activity_id, key, stream_published, stream_sequence)
);
