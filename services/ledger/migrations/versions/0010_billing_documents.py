"""Billing documents: billing profiles and settings per org, versioned tax rate tables (version
1 seeded with standard VAT/GST rates), and the tax snapshot of each payment order.

Revision ID: 0010
Revises: 0006_leases (0009_credit_leases.py)
"""

import json

from alembic import op

from tally.kit.db import run_script

revision = "0010"
down_revision = "0006_leases"
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
        -- One row per issuer, kind and year: locked by the transaction that issues a document
        -- (the one that records the payment or refund), so numbers are gapless: a rollback
        -- takes its number back with it. Not a sequence (sequences skip on rollback).
        CREATE TABLE ledger.document_counters (
            issuer              text NOT NULL,
            kind                text NOT NULL,
            year                integer NOT NULL,
            last_number         bigint NOT NULL,
            PRIMARY KEY (issuer, kind, year)
        );
        CREATE TABLE ledger.billing_documents (
            document_id         text PRIMARY KEY,
            kind                text NOT NULL CHECK (kind IN ('INVOICE', 'CREDIT_NOTE')),
            issuer              text NOT NULL,
            year                integer NOT NULL,
            number              bigint NOT NULL,
            org_id              text NOT NULL,
            payment_order_id    text NOT NULL
                                REFERENCES ledger.payment_orders (payment_order_id),
            refund_id           text NOT NULL DEFAULT '',
            invoice_id          text NOT NULL DEFAULT '',
            issued_at           timestamptz NOT NULL,
            currency            text NOT NULL,
            net_minor           bigint NOT NULL,
            tax_minor           bigint NOT NULL,
            gross_minor         bigint NOT NULL CHECK (net_minor + tax_minor = gross_minor),
            body                jsonb NOT NULL,
            UNIQUE (issuer, kind, year, number)
        );
        CREATE UNIQUE INDEX billing_documents_one_invoice_per_order
            ON ledger.billing_documents (payment_order_id) WHERE kind = 'INVOICE';
        CREATE UNIQUE INDEX billing_documents_one_note_per_refund
            ON ledger.billing_documents (refund_id) WHERE kind = 'CREDIT_NOTE';
        CREATE INDEX billing_documents_of_org
            ON ledger.billing_documents (org_id, issued_at DESC, document_id DESC);
        -- Issued documents are immutable.
        CREATE FUNCTION ledger.billing_documents_immutable() RETURNS trigger
            LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION 'billing documents are immutable once issued';
            END $$;
        CREATE TRIGGER billing_documents_immutable
            BEFORE UPDATE OR DELETE ON ledger.billing_documents
            FOR EACH ROW EXECUTE FUNCTION ledger.billing_documents_immutable();
        """
    )
    op.execute(
        "INSERT INTO ledger.tax_rate_tables (version, effective_from, rates_ppm, created_at, "
        "created_by) VALUES (1, '2000-01-01T00:00:00Z', '" + json.dumps(STANDARD_RATES_PPM)
        + "'::jsonb, now(), 'migration:0009')")


def downgrade() -> None:
    op.execute("DROP TABLE ledger.billing_documents")
    op.execute("DROP FUNCTION ledger.billing_documents_immutable()")
    op.execute("DROP TABLE ledger.document_counters")
    op.execute("DROP TABLE ledger.payment_order_taxes")
    op.execute("DROP TABLE ledger.tax_rate_tables")
    op.execute("DROP TABLE ledger.billing_settings")
    op.execute("DROP TABLE ledger.billing_profiles")
