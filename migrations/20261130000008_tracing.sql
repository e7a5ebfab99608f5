-- Trace context kept with work that resumes later from Postgres: a fire republished by the
-- reconciler, a run buffered by its overlap policy and started when the run before it ends. A W3C
-- `traceparent`; empty when trace export is off.
-- Owners: trigger (fires), orchestrator (runs).
ALTER TABLE fires ADD COLUMN traceparent text NOT NULL DEFAULT '';
ALTER TABLE runs ADD COLUMN traceparent text NOT NULL DEFAULT '';
