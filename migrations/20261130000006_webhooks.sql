-- Webhook deliveries taken in, for replay protection: a delivery id is accepted once per hook.
-- Owner: trigger.

-- A row is inserted in the transaction that publishes the delivery's event, so a delivery whose
-- publish failed leaves no row and can be sent again. Rows are pruned after 15 minutes: a
-- delivery's signed timestamp must be within 5 minutes of the receiver's clock, so an older
-- delivery is rejected by that check anyway (the margin covers clock skew with Postgres).
CREATE TABLE webhook_deliveries (
    hook        text NOT NULL,
    delivery_id text NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (hook, delivery_id)
);

CREATE INDEX webhook_deliveries_received ON webhook_deliveries (received_at);
