-- How many live activities there are and the total size of their current specs, kept up to date
-- by the transactions that change them (create, new version, delete), so that checking a change
-- against --max-activities and --max-definitions-bytes reads one row instead of summing every
-- live activity (which made creating n activities cost O(n²)).
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
