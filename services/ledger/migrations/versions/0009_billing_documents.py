"""Billing documents: billing profiles and billing settings per org.

Revision ID: 0009
Revises: 0008
"""

from alembic import op

from tally.kit.db import run_script

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_script(
        """
        CREATE TABLE ledger.billing_profiles (
            org_id              text PRIMARY KEY,
            legal_name          text NOT NULL DEFAULT '',
            address_line1       text NOT NULL DEFAULT '',
            address_line2       text NOT NULL DEFAULT '',
            city                text NOT NULL DEFAULT '',
            postal_code         text NOT NULL DEFAULT '',
            region              text NOT NULL DEFAULT '',
            country             text NOT NULL DEFAULT '',
            tax_id              text NOT NULL DEFAULT '',
            invoice_email       text NOT NULL DEFAULT '',
            currency            text NOT NULL DEFAULT '',
            updated_at          timestamptz NOT NULL,
            updated_by          text NOT NULL
        );
        CREATE TABLE ledger.billing_settings (
            org_id              text PRIMARY KEY,
            profile_required    boolean NOT NULL DEFAULT false,
            updated_at          timestamptz NOT NULL,
            updated_by          text NOT NULL
        );
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE ledger.billing_settings")
    op.execute("DROP TABLE ledger.billing_profiles")
