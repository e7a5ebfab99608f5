-- The size of each version's spec: its canonical JSON in compact form, as the admin API measured
-- it (`model::sizes`), so that the total of the live activities' specs is checked, under a lock,
-- in the transaction that adds one (`--max-definitions-bytes`).
-- Owner: trigger.

ALTER TABLE activity_versions ADD COLUMN spec_bytes bigint;
-- Versions stored before count their jsonb text, a little longer than compact JSON (", ", ": ").
UPDATE activity_versions SET spec_bytes = octet_length(spec::text);
ALTER TABLE activity_versions ALTER COLUMN spec_bytes SET NOT NULL;
