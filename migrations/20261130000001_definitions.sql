-- Activity definitions and their immutable versions.
-- Owner: trigger (the admin API writes them; the orchestrator reads the pinned version).

CREATE TABLE activities (
    id              uuid PRIMARY KEY,
    name            text NOT NULL,
    current_version integer NOT NULL,
    enabled         boolean NOT NULL,
    paused          boolean NOT NULL DEFAULT false,
    pause_note      text NOT NULL DEFAULT '',
    trigger_kind    text NOT NULL CHECK (trigger_kind IN ('schedule', 'event', 'manual')),
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz
);

-- A name is unique among live activities; a deleted one frees its name.
CREATE UNIQUE INDEX activities_live_name ON activities (name) WHERE deleted_at IS NULL;

CREATE TABLE activity_versions (
    activity_id uuid NOT NULL REFERENCES activities (id),
    version     integer NOT NULL CHECK (version >= 1),
    -- The ActivitySpec in its canonical proto3 JSON form.
    spec        jsonb NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (activity_id, version)
);

-- Bumped on every definition change; trigger replicas poll it to reload.
CREATE SEQUENCE definitions_generation;
