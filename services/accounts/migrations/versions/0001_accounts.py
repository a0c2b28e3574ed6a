"""Accounts: orgs, projects, environments, members, API keys and the credentials change feed.

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
        CREATE TABLE accounts.orgs (
            org_id      text PRIMARY KEY,
            name        text NOT NULL,
            region      text NOT NULL,
            seat_limit  integer NOT NULL CHECK (seat_limit >= 1),
            created_at  timestamptz NOT NULL
        );
        CREATE TABLE accounts.projects (
            org_id      text NOT NULL REFERENCES accounts.orgs,
            project_id  text NOT NULL,
            name        text NOT NULL,
            created_at  timestamptz NOT NULL,
            PRIMARY KEY (org_id, project_id)
        );
        CREATE TABLE accounts.environments (
            org_id          text NOT NULL,
            project_id      text NOT NULL,
            environment_id  text NOT NULL,
            name            text NOT NULL,
            created_at      timestamptz NOT NULL,
            PRIMARY KEY (org_id, project_id, environment_id),
            FOREIGN KEY (org_id, project_id) REFERENCES accounts.projects
        );
        CREATE TABLE accounts.members (
            org_id      text NOT NULL REFERENCES accounts.orgs,
            subject     text NOT NULL,
            role        text NOT NULL
                        CHECK (role IN ('owner', 'admin', 'billing', 'developer', 'viewer')),
            created_at  timestamptz NOT NULL,
            PRIMARY KEY (org_id, subject)
        );
        CREATE TABLE accounts.api_keys (
            key_id          text PRIMARY KEY,
            org_id          text NOT NULL REFERENCES accounts.orgs,
            project_id      text NOT NULL DEFAULT '',
            environment_id  text NOT NULL DEFAULT '',
            role            text NOT NULL,
            name            text NOT NULL,
            prefix          text NOT NULL,
            secret_sha256   text NOT NULL UNIQUE,
            created_at      timestamptz NOT NULL,
            created_by      text NOT NULL,
            expires_at      timestamptz,
            revoked_at      timestamptz,
            replaced_by     text NOT NULL DEFAULT '',
            -- the idempotency claim of the CreateApiKey / RotateApiKey that made it
            request_key     text NOT NULL UNIQUE,
            request_hash    text NOT NULL
        );
        CREATE INDEX api_keys_org ON accounts.api_keys (org_id, key_id);
        -- One row per change of a key or membership, in commit order of the revision
        -- sequence; WatchCredentials streams these. A change is written in the transaction
        -- that makes it, and NOTIFY accounts_credentials wakes every replica's feed.
        CREATE TABLE accounts.credential_changes (
            revision    bigserial PRIMARY KEY,
            kind        text NOT NULL CHECK (kind IN ('key', 'member')),
            org_id      text NOT NULL,
            ref         text NOT NULL,
            changed_at  timestamptz NOT NULL DEFAULT now()
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP SCHEMA accounts CASCADE")
