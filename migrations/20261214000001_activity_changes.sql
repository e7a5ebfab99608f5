-- Which transaction last changed each activity, so trigger replicas reload only what changed
-- (not every live activity on every change: creating n activities cost O(n²) reads). A reload
-- reads the rows changed by transactions not yet finished at the previous reload's snapshot
-- (its xmin), so a change that commits late is never skipped. Set by the database on every
-- insert and update, whoever writes.
-- Owner: trigger.
ALTER TABLE activities ADD COLUMN changed_xid xid8;
UPDATE activities SET changed_xid = pg_current_xact_id();
ALTER TABLE activities ALTER COLUMN changed_xid SET NOT NULL;
CREATE INDEX activities_changed ON activities (changed_xid);

CREATE FUNCTION activities_stamp_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.changed_xid := pg_current_xact_id();
    RETURN NEW;
END
$$;

CREATE TRIGGER activities_stamp_change BEFORE INSERT OR UPDATE ON activities
    FOR EACH ROW EXECUTE FUNCTION activities_stamp_change();
