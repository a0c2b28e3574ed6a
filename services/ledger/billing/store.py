"""BillingStore: billing profiles and billing settings in PostgreSQL, sharing the ledger's pool,
clock and idempotency keys (every write is idempotent on its request id)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from services.ledger import domain as d
from services.ledger.billing import domain as b
from services.ledger.store import LedgerStore, Work
from tally.kit.errors import Reason, TallyError

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


class BillingStore:
    """Persistence of billing profiles and settings."""

    def __init__(self, ledger: LedgerStore) -> None:
        self.ledger = ledger
        self.pool = ledger.pool

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
