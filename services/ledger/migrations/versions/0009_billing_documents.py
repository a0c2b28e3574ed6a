"""Billing documents: billing profiles and settings per org, versioned tax rate tables (version
1 seeded with standard VAT/GST rates), and the tax snapshot of each payment order.

Revision ID: 0009
Revises: 0008
"""

import json

from alembic import op

from tally.kit.db import run_script

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# Standard rates (parts per million) of the EU states, GB, CH, NO and AU. US sales tax is left
# to tables an operator publishes (US-<state>).
STANDARD_RATES_PPM = {
    "AT": 200000, "BE": 210000, "BG": 200000, "CY": 190000, "CZ": 210000, "DE": 190000,
    "DK": 250000, "EE": 240000, "ES": 210000, "FI": 255000, "FR": 200000, "GR": 240000,
    "HR": 250000, "HU": 270000, "IE": 230000, "IT": 220000, "LT": 210000, "LU": 170000,
    "LV": 210000, "MT": 180000, "NL": 210000, "PL": 230000, "PT": 230000, "RO": 210000,
    "SE": 250000, "SI": 220000, "SK": 230000, "GB": 200000, "CH": 81000, "NO": 250000,
    "AU": 100000,
}


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
        -- Rates are data: a change is a new version; a version is never altered.
        CREATE TABLE ledger.tax_rate_tables (
            version             integer PRIMARY KEY,
            effective_from      timestamptz NOT NULL,
            rates_ppm           jsonb NOT NULL,
            created_at          timestamptz NOT NULL,
            created_by          text NOT NULL,
            request_id          text UNIQUE
        );
        -- Written with the order, in its transaction; never updated.
        CREATE TABLE ledger.payment_order_taxes (
            payment_order_id    text PRIMARY KEY
                                REFERENCES ledger.payment_orders (payment_order_id),
            org_id              text NOT NULL,
            rule                text NOT NULL,
            jurisdiction        text NOT NULL,
            rate_ppm            integer NOT NULL,
            rate_table_version  integer NOT NULL REFERENCES ledger.tax_rate_tables (version),
            gross_minor         bigint NOT NULL,
            tax_minor           bigint NOT NULL,
            net_minor           bigint NOT NULL CHECK (net_minor + tax_minor = gross_minor),
            currency            text NOT NULL,
            issuer_country      text NOT NULL,
            issuer_tax_id       text NOT NULL,
            customer_country    text NOT NULL,
            customer_tax_id     text NOT NULL,
            legal_text          text NOT NULL,
            created_at          timestamptz NOT NULL
        );
        """
    )
    op.execute(
        "INSERT INTO ledger.tax_rate_tables (version, effective_from, rates_ppm, created_at, "
        "created_by) VALUES (1, '2000-01-01T00:00:00Z', '" + json.dumps(STANDARD_RATES_PPM)
        + "'::jsonb, now(), 'migration:0009')")


def downgrade() -> None:
    op.execute("DROP TABLE ledger.payment_order_taxes")
    op.execute("DROP TABLE ledger.tax_rate_tables")
    op.execute("DROP TABLE ledger.billing_settings")
    op.execute("DROP TABLE ledger.billing_profiles")
