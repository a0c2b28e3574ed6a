"""Usage roll-ups: summaries read these, never raw events.

`usage_daily` holds one row per (org, day, project, environment, user, model, operation,
meter): quantity, credits and how many events contributed. An event with several meters counts
once in each of its meters' rows, so those counts cannot give "distinct events";
`usage_daily_events` holds that: the same key without the meter, each event counted once.
The writer (RecordUsage / StreamUsage) upserts both in the transaction that stores the events.

Column values: `meter` is the rating library's meter name (`tally.rating.Meter`, e.g.
"input_tokens"); `operation` is the proto Operation name lower-cased without its prefix (e.g.
"chat"); '' means "not given".

Revision ID: 0001
Revises:
"""

from alembic import op

from tally.kit.db import run_script

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(
        """
        CREATE TABLE metering.usage_daily (
            org_id         text NOT NULL,
            day            date NOT NULL,
            project_id     text NOT NULL DEFAULT '',
            environment    text NOT NULL DEFAULT '',
            user_id        text NOT NULL DEFAULT '',
            model          text NOT NULL DEFAULT '',
            operation      text NOT NULL DEFAULT '',
            meter          text NOT NULL,
            quantity       bigint NOT NULL DEFAULT 0,
            credits_micros bigint NOT NULL DEFAULT 0,
            event_count    bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (org_id, day, project_id, environment, user_id, model, operation, meter)
        );
        CREATE TABLE metering.usage_daily_events (
            org_id         text NOT NULL,
            day            date NOT NULL,
            project_id     text NOT NULL DEFAULT '',
            environment    text NOT NULL DEFAULT '',
            user_id        text NOT NULL DEFAULT '',
            model          text NOT NULL DEFAULT '',
            operation      text NOT NULL DEFAULT '',
            event_count    bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (org_id, day, project_id, environment, user_id, model, operation)
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE metering.usage_daily_events")
    op.execute("DROP TABLE metering.usage_daily")
