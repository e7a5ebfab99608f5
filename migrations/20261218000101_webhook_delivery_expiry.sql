-- Each delivery id is kept until its own expiry, set when it is taken in: 15 minutes for hooks
-- whose senders sign a time and retry within it (taskfactory's own, Slack); 7 days for GitHub
-- (it signs no time) and for senders that retry for days with a fresh timestamp (Stripe, Standard
-- Webhooks). Pruning by the row's own expiry keeps it right whatever hooks the pruning replica
-- has configured. Owner: trigger.
ALTER TABLE webhook_deliveries ADD COLUMN expires_at timestamptz;
UPDATE webhook_deliveries SET expires_at = received_at + interval '15 minutes';
ALTER TABLE webhook_deliveries ALTER COLUMN expires_at SET NOT NULL;
DROP INDEX webhook_deliveries_received;
CREATE INDEX webhook_deliveries_expiry ON webhook_deliveries (expires_at);
