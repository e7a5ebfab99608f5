-- The audit log of the admin API, and who made each activity version.
-- Owner: trigger (the admin API writes both).
--
-- Every call that changes something, or could (PreviewRun runs context sources), is one row,
-- whether it was carried out or refused. Rows are never changed or deleted: the triggers below
-- refuse UPDATE, DELETE and TRUNCATE (only the table's owner could lift that, by disabling them
-- on purpose).

CREATE TABLE audit_events (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at              timestamptz NOT NULL DEFAULT now(),
    principal       text NOT NULL,
    auth_method     text NOT NULL,
    grants          text[] NOT NULL DEFAULT '{}',
    rpc             text NOT NULL,
    target_kind     text NOT NULL DEFAULT '',
    target_id       text NOT NULL DEFAULT '',
    activity_id     uuid,
    activity_name   text NOT NULL DEFAULT '',
    version_before  integer,
    version_after   integer,
    idempotency_key text NOT NULL DEFAULT '',
    outcome         text NOT NULL,
    error           text NOT NULL DEFAULT '',
    trace_id        text NOT NULL DEFAULT '',
    details         jsonb NOT NULL DEFAULT '{}'
);

CREATE INDEX audit_events_activity ON audit_events (activity_id, id);
CREATE INDEX audit_events_principal ON audit_events (principal, id);
CREATE INDEX audit_events_at ON audit_events (at);

CREATE FUNCTION audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_events is append-only: % refused', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;

CREATE TRIGGER audit_events_no_update BEFORE UPDATE OR DELETE ON audit_events
    FOR EACH ROW EXECUTE FUNCTION audit_events_append_only();
CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events
    FOR EACH STATEMENT EXECUTE FUNCTION audit_events_append_only();

-- Who made each version: the principal of the call (empty for versions made before this).
ALTER TABLE activity_versions ADD COLUMN created_by text NOT NULL DEFAULT '';
