"""The local (development) payment provider's webhook events, kept with the payment change that
made them and sent until the ledger answers 2xx: a ledger replica SIGKILLed between taking a
payment and delivering its event leaves the event here, and the replica that comes back (or
any other) sends it. A real provider keeps its undelivered webhooks the same way.

`next_attempt_at` is unix seconds (the provider's clock); the row lock of the replica making
an attempt is the claim, so a crashed sender's claim ends with its connection.

Revision ID: local_provider_events
Revises: seal_billing_state_after
"""

from tally.kit.db import run_script

revision = "local_provider_events"
down_revision = "seal_billing_state_after"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(
        """
        CREATE TABLE ledger.local_provider_events (
            event_id        text PRIMARY KEY,
            body            jsonb NOT NULL,
            attempts        integer NOT NULL DEFAULT 0,
            next_attempt_at double precision NOT NULL,
            delivered       boolean NOT NULL DEFAULT false,
            gave_up         boolean NOT NULL DEFAULT false
        );
        CREATE INDEX local_provider_events_pending ON ledger.local_provider_events
            (next_attempt_at) WHERE NOT delivered AND NOT gave_up;
        """
    )


def downgrade() -> None:
    run_script("DROP TABLE ledger.local_provider_events;")
