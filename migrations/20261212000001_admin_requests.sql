-- Requests the admin API sends an orchestrator (CancelRun, CompleteTask, RetryTask, PreviewRun on
-- taskfactory.internal.*), recorded before they are sent: an orchestrator carries out only a
-- request whose id and body hash are here, once, within a few minutes. A message published on
-- those subjects by anyone else is refused, however wide NATS permissions are.
-- Owner: trigger (admin_requests); orchestrator (admin_requests_used, the ids it carried out).

CREATE TABLE admin_requests (
    id          uuid PRIMARY KEY,
    op          text NOT NULL,
    body_sha256 bytea NOT NULL,
    principal   text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX admin_requests_created ON admin_requests (created_at);

CREATE TABLE admin_requests_used (
    id      uuid PRIMARY KEY,
    used_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX admin_requests_used_at ON admin_requests_used (used_at);
