"""BillingStore: billing profiles and billing settings in PostgreSQL, sharing the ledger's pool,
clock and idempotency keys (every write is idempotent on its request id)."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

from services.ledger import domain as d
from services.ledger.billing import documents as docs
from services.ledger.billing import domain as b
from services.ledger.billing import tax
from services.ledger.payments import domain as p
from services.ledger.store import LedgerStore, Work
from tally.kit.errors import Reason, TallyError
from tally.kit.paging import encode_time_cursor, time_cursor_page

if TYPE_CHECKING:
    from services.ledger.store import Connection, Row


def _profile(r: Row) -> b.BillingProfile:
    return b.BillingProfile(
        r["org_id"], r["legal_name"],
        b.Address(r["address_line1"], r["address_line2"], r["city"], r["postal_code"],
                  r["region"]),
        r["country"], r["tax_id"], r["invoice_email"], r["currency"], r["updated_at"],
        r["updated_by"])


def _no_profile(org_id: str) -> TallyError:
    return TallyError(Reason.NOT_FOUND, f"org_id: org {org_id!r} has no billing profile",
                      field="org_id")


DEFAULT_ISSUER: Final = tax.Issuer("Tally (development)", "DE", "DE123456789",
                                   "Invalidenstraße 1, 10115 Berlin, Germany")
"""The issuer when the ledger's settings name none (development)."""


class BillingStore:
    """Persistence of billing profiles and settings."""

    def __init__(self, ledger: LedgerStore, issuer: tax.Issuer | None = None) -> None:
        self.ledger = ledger
        self.pool = ledger.pool
        self.issuer = issuer or DEFAULT_ISSUER

    async def set_profile(self, request_id: str, profile: b.BillingProfile, caller: d.Caller
                          ) -> b.BillingProfile:
        """Creates or replaces an org's profile, idempotently on `request_id`."""
        async with self.pool.acquire() as conn, conn.transaction():
            work = Work(conn, self.ledger.clock(), caller)
            if await work.claim(f"billing-profile:{request_id}", d.fingerprint(profile)):
                a = profile.address
                await conn.execute(
                    "INSERT INTO ledger.billing_profiles (org_id, legal_name, address_line1, "
                    "address_line2, city, postal_code, region, country, tax_id, "
                    "invoice_email, currency, updated_at, updated_by) "
                    "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13) "
                    "ON CONFLICT (org_id) DO UPDATE SET legal_name = $2, address_line1 = $3, "
                    "address_line2 = $4, city = $5, postal_code = $6, region = $7, "
                    "country = $8, tax_id = $9, invoice_email = $10, currency = $11, "
                    "updated_at = $12, updated_by = $13",
                    profile.org_id, profile.legal_name, a.line1, a.line2, a.city,
                    a.postal_code, a.region, profile.country, profile.tax_id,
                    profile.invoice_email, profile.currency, work.now, caller.actor)
            found = await self._profile(conn, profile.org_id)
            return found or profile

    async def get_profile(self, org_id: str) -> b.BillingProfile:
        """An org's profile (NOT_FOUND if it has none)."""
        d.raise_if([d.check_id("org_id", org_id)])
        async with self.pool.acquire() as conn:
            found = await self._profile(conn, org_id)
        if found is None:
            raise _no_profile(org_id)
        return found

    async def find_profile(self, conn: Connection, org_id: str) -> b.BillingProfile | None:
        """An org's profile, if it has one, read on `conn`."""
        return await self._profile(conn, org_id)

    async def delete_profile(self, request_id: str, org_id: str, caller: d.Caller) -> None:
        """Removes an org's profile, idempotently on `request_id` (documents already issued
        keep their own copy of it)."""
        async with self.pool.acquire() as conn, conn.transaction():
            work = Work(conn, self.ledger.clock(), caller)
            if not await work.claim(f"billing-profile:{request_id}",
                                    d.fingerprint("delete", org_id)):
                return
            deleted = await conn.fetchval(
                "DELETE FROM ledger.billing_profiles WHERE org_id = $1 RETURNING true", org_id)
            if not deleted:
                raise _no_profile(org_id)  # rolls the claim back too

    @staticmethod
    async def _profile(conn: Connection, org_id: str) -> b.BillingProfile | None:
        row = await conn.fetchrow("SELECT * FROM ledger.billing_profiles WHERE org_id = $1",
                                  org_id)
        return _profile(row) if row else None

    async def set_settings(self, request_id: str, settings: b.BillingSettings,
                           caller: d.Caller) -> b.BillingSettings:
        """Replaces an org's billing settings, idempotently on `request_id`."""
        async with self.pool.acquire() as conn, conn.transaction():
            work = Work(conn, self.ledger.clock(), caller)
            if await work.claim(f"billing-settings:{request_id}", d.fingerprint(settings)):
                await conn.execute(
                    "INSERT INTO ledger.billing_settings (org_id, profile_required, "
                    "updated_at, updated_by) VALUES ($1, $2, $3, $4) ON CONFLICT (org_id) "
                    "DO UPDATE SET profile_required = $2, updated_at = $3, updated_by = $4",
                    settings.org_id, settings.profile_required, work.now, caller.actor)
            return await self.settings_in(conn, settings.org_id)

    async def get_settings(self, org_id: str) -> b.BillingSettings:
        """An org's billing settings (the defaults if never set)."""
        d.raise_if([d.check_id("org_id", org_id)])
        async with self.pool.acquire() as conn:
            return await self.settings_in(conn, org_id)

    @staticmethod
    async def settings_in(conn: Connection, org_id: str) -> b.BillingSettings:
        """An org's billing settings read on `conn`."""
        row = await conn.fetchrow("SELECT * FROM ledger.billing_settings WHERE org_id = $1",
                                  org_id)
        if row is None:
            return b.BillingSettings(org_id)
        return b.BillingSettings(org_id, row["profile_required"], row["updated_at"],
                                 row["updated_by"])

    async def check_can_buy(self, org_id: str) -> None:
        """BILLING_PROFILE_INCOMPLETE (naming the missing fields) when the org's settings
        require a complete profile and it has none."""
        async with self.pool.acquire() as conn:
            settings = await self.settings_in(conn, org_id)
            if settings.profile_required:
                b.check_complete(settings, await self._profile(conn, org_id))

    # -- tax -------------------------------------------------------------------------------

    @staticmethod
    async def rate_table_in(conn: Connection, at: datetime) -> tax.TaxRateTable:
        """The rate table in force at `at` (the newest version effective by then)."""
        row = await conn.fetchrow(
            "SELECT version, rates_ppm, effective_from FROM ledger.tax_rate_tables "
            "WHERE effective_from <= $1 ORDER BY version DESC LIMIT 1", at)
        if row is None:
            return tax.TaxRateTable(0, {})
        return tax.TaxRateTable(row["version"], dict(json.loads(row["rates_ppm"])),
                                row["effective_from"])

    async def rate_table(self, version: int = 0) -> tax.TaxRateTable:
        """One version of the rates (the one in force now when `version` is 0)."""
        async with self.pool.acquire() as conn:
            if version == 0:
                return await self.rate_table_in(conn, self.ledger.clock())
            row = await conn.fetchrow(
                "SELECT version, rates_ppm, effective_from FROM ledger.tax_rate_tables "
                "WHERE version = $1", version)
        if row is None:
            raise TallyError(Reason.NOT_FOUND, f"version: no tax rate table {version}",
                             field="version")
        return tax.TaxRateTable(row["version"], dict(json.loads(row["rates_ppm"])),
                                row["effective_from"])

    async def publish_rates(self, request_id: str, rates_ppm: dict[str, int],
                            effective_from: datetime | None, caller: d.Caller
                            ) -> tax.TaxRateTable:
        """A new version of the rates, effective now or later (never in the past: orders
        already made keep the rates they were made with). Idempotent on `request_id`."""
        async with self.pool.acquire() as conn, conn.transaction():
            work = Work(conn, self.ledger.clock(), caller)
            start = effective_from or work.now
            if start < work.now - PUBLISH_SLACK:
                raise TallyError(Reason.INVALID_ARGUMENT,
                                 "effective_from: rates never change retroactively",
                                 field="effective_from")
            await conn.execute("LOCK TABLE ledger.tax_rate_tables IN EXCLUSIVE MODE")
            if await work.claim(f"tax-rates:{request_id}",
                                d.fingerprint(sorted(rates_ppm.items()), effective_from)):
                version = await conn.fetchval(
                    "INSERT INTO ledger.tax_rate_tables (version, effective_from, rates_ppm, "
                    "created_at, created_by, request_id) SELECT coalesce(max(version), 0) + 1, "
                    "$1, $2, $3, $4, $5 FROM ledger.tax_rate_tables RETURNING version",
                    start, json.dumps(rates_ppm), work.now, caller.actor, request_id)
            else:
                version = await conn.fetchval(
                    "SELECT version FROM ledger.tax_rate_tables WHERE request_id = $1",
                    request_id)
            row = await conn.fetchrow("SELECT * FROM ledger.tax_rate_tables WHERE version = $1",
                                      version)
            assert row is not None
            return tax.TaxRateTable(row["version"], dict(json.loads(row["rates_ppm"])),
                                    row["effective_from"])

    async def record_tax(self, conn: Connection, order: p.PaymentOrder) -> None:
        """Stores the tax snapshot of a new order, in the transaction that creates it: from
        the org's profile and the rates in force as they are now, never recomputed."""
        customer = await self._profile(conn, order.org_id)
        table = await self.rate_table_in(conn, order.created_at)
        taken = tax.snapshot(self.issuer, customer, table, order.amount_minor, order.currency)
        await conn.execute(
            "INSERT INTO ledger.payment_order_taxes (payment_order_id, org_id, rule, "
            "jurisdiction, rate_ppm, rate_table_version, gross_minor, tax_minor, net_minor, "
            "currency, issuer_country, issuer_tax_id, customer_country, customer_tax_id, "
            "legal_text, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, "
            "$12, $13, $14, $15, $16)",
            order.payment_order_id, order.org_id, taken.rule.value, taken.jurisdiction,
            taken.rate_ppm, taken.rate_table_version, taken.gross_minor, taken.tax_minor,
            taken.net_minor, taken.currency, taken.issuer_country, taken.issuer_tax_id,
            taken.customer_country, taken.customer_tax_id, taken.legal_text, order.created_at)

    async def tax_of(self, org_id: str, order_id: str) -> tax.TaxSnapshot:
        """The tax snapshot of an org's order (NOT_FOUND for another org's order)."""
        d.raise_if([d.check_id("org_id", org_id), d.check_id("payment_order_id", order_id)])
        row = await self.pool.fetchrow(
            "SELECT * FROM ledger.payment_order_taxes WHERE payment_order_id = $1 "
            "AND org_id = $2", order_id, org_id)
        if row is None:
            raise TallyError(Reason.NOT_FOUND,
                             f"payment_order_id: no order {order_id!r} of org {org_id!r}",
                             field="payment_order_id")
        return _snapshot(row)


    # -- invoices and credit notes ---------------------------------------------------------

    @property
    def issuer_key(self) -> str:
        """Whose number series a document is in: the issuer's tax id (or its name)."""
        return self.issuer.tax_id or self.issuer.legal_name

    async def allocate_number(self, conn: Connection, kind: docs.DocumentKind, year: int
                              ) -> int:
        """The next number of a series, taken in the caller's transaction: the counter row
        stays locked until it commits, and a rollback (or a crash) takes the number back."""
        number = await conn.fetchval(
            "INSERT INTO ledger.document_counters (issuer, kind, year, last_number) "
            "VALUES ($1, $2, $3, 1) ON CONFLICT (issuer, kind, year) DO UPDATE "
            "SET last_number = ledger.document_counters.last_number + 1 RETURNING last_number",
            self.issuer_key, kind.value, year)
        return int(number)

    async def _tax_for(self, conn: Connection, order: p.PaymentOrder) -> tax.TaxSnapshot:
        row = await conn.fetchrow(
            "SELECT * FROM ledger.payment_order_taxes WHERE payment_order_id = $1",
            order.payment_order_id)
        if row is not None:
            return _snapshot(row)
        # an order made before snapshots existed: its tax as the rates in force when it was made
        customer = await self._profile(conn, order.org_id)
        table = await self.rate_table_in(conn, order.created_at)
        return tax.snapshot(self.issuer, customer, table, order.amount_minor, order.currency)

    async def issue_invoice(self, conn: Connection, order: p.PaymentOrder, now: datetime
                            ) -> docs.Document:
        """Issues the invoice of an order that succeeded, in the transaction recording it."""
        kind, year = docs.DocumentKind.INVOICE, now.astimezone(UTC).year
        snapshot = await self._tax_for(conn, order)
        profile = await self._profile(conn, order.org_id)
        number = await self.allocate_number(conn, kind, year)
        document = docs.invoice(docs.document_number(kind, year, number), number, year, order,
                                snapshot, self.issuer, profile, now)
        await self._insert_document(conn, document)
        return document

    async def issue_credit_note(self, conn: Connection, order_before: p.PaymentOrder,
                                refund_id: str, plan: p.RefundPlan, now: datetime
                                ) -> docs.Document | None:
        """Issues the credit note of a refund that returns money, against the order's invoice,
        in the transaction recording the refund."""
        if plan.provider_refund_minor == 0:
            return None
        row = await conn.fetchrow(
            "SELECT * FROM ledger.billing_documents WHERE payment_order_id = $1 "
            "AND kind = 'INVOICE'", order_before.payment_order_id)
        if row is None:
            raise TallyError(Reason.INTERNAL, f"order {order_before.payment_order_id} was "
                                              "paid without an invoice")
        kind, year = docs.DocumentKind.CREDIT_NOTE, now.astimezone(UTC).year
        number = await self.allocate_number(conn, kind, year)
        document = docs.credit_note(docs.document_number(kind, year, number), number, year,
                                    _document(row), order_before, refund_id,
                                    plan.provider_refund_minor, plan.reversed_micros, now)
        await self._insert_document(conn, document)
        return document

    @staticmethod
    async def _insert_document(conn: Connection, doc: docs.Document) -> None:
        body = {"issuer": asdict(doc.issuer), "customer": asdict(doc.customer),
                "lines": [asdict(line) for line in doc.lines],
                "tax": {**asdict(doc.tax), "rule": doc.tax.rule.value},
                "payment_reference": doc.payment_reference, "notes": doc.notes}
        await conn.execute(
            "INSERT INTO ledger.billing_documents (document_id, kind, issuer, year, number, "
            "org_id, payment_order_id, refund_id, invoice_id, issued_at, currency, net_minor, "
            "tax_minor, gross_minor, body) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, "
            "$11, $12, $13, $14, $15)",
            doc.document_id, doc.kind.value, doc.issuer.tax_id or doc.issuer.legal_name,
            doc.year, doc.number, doc.org_id, doc.payment_order_id, doc.refund_id,
            doc.invoice_id, doc.issued_at, doc.currency, doc.net_minor, doc.tax_minor,
            doc.gross_minor, json.dumps(body))

    async def get_document(self, org_id: str, document_id: str) -> docs.Document:
        """One document of an org (NOT_FOUND for a document of another org, or none)."""
        d.raise_if([d.check_id("org_id", org_id), d.check_id("invoice_id", document_id)])
        row = await self.pool.fetchrow(
            "SELECT * FROM ledger.billing_documents WHERE document_id = $1 AND org_id = $2",
            document_id, org_id)
        if row is None:
            raise TallyError(Reason.NOT_FOUND,
                             f"invoice_id: no document {document_id!r} of org {org_id!r}",
                             field="invoice_id")
        return _document(row)

    async def list_documents(self, org_id: str, *, size: int = 0, token: str = ""
                             ) -> tuple[list[docs.Document], str]:
        """An org's invoices and credit notes, newest first, keyset-paged."""
        limit, after = time_cursor_page(size, token, "documents",
                                        also=[d.check_id("org_id", org_id)])
        before_at, before_id = after if after else (None, "")
        rows = await self.pool.fetch(
            "SELECT * FROM ledger.billing_documents WHERE org_id = $1 "
            "AND ($2::timestamptz IS NULL OR (issued_at, document_id) < ($2, $3)) "
            "ORDER BY issued_at DESC, document_id DESC LIMIT $4",
            org_id, before_at, before_id, limit + 1)
        found = [_document(r) for r in rows[:limit]]
        last = found[-1] if found and len(rows) > limit else None
        return found, (encode_time_cursor("documents", last.issued_at, last.document_id)
                       if last else "")


def _party(raw: dict[str, Any]) -> docs.Party:
    return docs.Party(raw["legal_name"], list(raw["address"]), raw["country"], raw["tax_id"],
                      raw.get("email", ""))


def _document(r: Row) -> docs.Document:
    body = json.loads(r["body"])
    t = body["tax"]
    return docs.Document(
        r["document_id"], docs.DocumentKind(r["kind"]), r["number"], r["year"], r["org_id"],
        r["payment_order_id"], r["issued_at"], r["currency"], _party(body["issuer"]),
        _party(body["customer"]),
        [docs.Line(x["description"], x["credits_micros"], x["net_minor"])
         for x in body["lines"]],
        tax.TaxSnapshot(**{**t, "rule": tax.TaxRule(t["rule"])}), r["net_minor"],
        r["tax_minor"], r["gross_minor"], body["payment_reference"], r["refund_id"],
        r["invoice_id"], list(body["notes"]))


PUBLISH_SLACK: Final = timedelta(minutes=5)
"""How far in the past a new table's start may be (clock skew of the publisher)."""


def _snapshot(r: Row) -> tax.TaxSnapshot:
    return tax.TaxSnapshot(
        tax.TaxRule(r["rule"]), r["jurisdiction"], r["rate_ppm"], r["rate_table_version"],
        r["gross_minor"], r["tax_minor"], r["net_minor"], r["currency"], r["issuer_country"],
        r["issuer_tax_id"], r["customer_country"], r["customer_tax_id"], r["legal_text"])
