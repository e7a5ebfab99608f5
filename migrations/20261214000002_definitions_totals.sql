-- How many live activities there are and the total size of their current specs, kept by the
-- database as they change (whoever writes: a replica of any version), so that checking a change
-- against --max-activities and --max-definitions-bytes reads one row instead of summing every
-- live activity (which made creating n activities cost O(n²)).
-- - a create inserts the activity (current_version 1), then its version 1: counted then;
-- - a new version is inserted before the activity moves to it: counted when it moves;
-- - a delete (deleted_at set) takes its current spec out.
-- Owner: trigger.
CREATE TABLE definitions_totals (
    singleton  boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    activities bigint NOT NULL,
    bytes      bigint NOT NULL
);
INSERT INTO definitions_totals (activities, bytes)
SELECT count(*), COALESCE(sum(v.spec_bytes), 0)
FROM activities a
JOIN activity_versions v ON v.activity_id = a.id AND v.version = a.current_version
WHERE a.deleted_at IS NULL;

CREATE FUNCTION definitions_totals_version() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM activities a WHERE a.id = NEW.activity_id
               AND a.current_version = NEW.version AND a.deleted_at IS NULL) THEN
        UPDATE definitions_totals SET activities = activities + 1, bytes = bytes + NEW.spec_bytes;
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER definitions_totals_version AFTER INSERT ON activity_versions
    FOR EACH ROW EXECUTE FUNCTION definitions_totals_version();

CREATE FUNCTION definitions_totals_activity() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    old_bytes bigint;
    new_bytes bigint;
BEGIN
    IF OLD.deleted_at IS NOT NULL THEN
        RETURN NULL;
    END IF;
    SELECT spec_bytes INTO old_bytes FROM activity_versions
        WHERE activity_id = OLD.id AND version = OLD.current_version;
    IF NEW.deleted_at IS NOT NULL THEN
        UPDATE definitions_totals SET activities = activities - 1,
            bytes = bytes - COALESCE(old_bytes, 0);
    ELSIF NEW.current_version <> OLD.current_version THEN
        SELECT spec_bytes INTO new_bytes FROM activity_versions
            WHERE activity_id = NEW.id AND version = NEW.current_version;
        UPDATE definitions_totals
            SET bytes = bytes + COALESCE(new_bytes, 0) - COALESCE(old_bytes, 0);
    END IF;
    RETURN NULL;
END
$$;
CREATE TRIGGER definitions_totals_activity AFTER UPDATE OF deleted_at, current_version ON activities
    FOR EACH ROW EXECUTE FUNCTION definitions_totals_activity();
