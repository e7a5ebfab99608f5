-- Owner: trigger. Debounce and batch combined with flow.concurrency, flow.throttle and
-- flow.priority: a buffer's run is admitted as its first event says (`flow`, an encoded
-- FlowAdmission with the first event's place), and events whose runs would be admitted under
-- other keys or limits are gathered apart: the row's `key` is then the gathering key with a
-- digest of the admission, and `shown_key` the gathering key (what the run's `{batch, key, size}`
-- and the decisions show).
ALTER TABLE event_buffers
    ADD COLUMN flow bytea,
    ADD COLUMN shown_key text;
