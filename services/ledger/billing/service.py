"""Billing: validation in front of the billing store (profiles and settings)."""

from __future__ import annotations

from datetime import datetime

from services.ledger import domain as d
from services.ledger.billing import domain as b
from services.ledger.billing import reconcile, tax
from services.ledger.billing import statements as st
from services.ledger.billing.statement_store import StatementStore
from services.ledger.billing.store import BillingStore


class Billing:
    """Billing profiles and settings of orgs."""

    def __init__(self, store: BillingStore, itemizer: st.UsageItemizer | None = None) -> None:
        self.store = store
        self.itemizer = itemizer or st.NoItemizer()
        self.statements = StatementStore(store.pool, store.ledger.clock, self.itemizer)

    async def set_profile(self, request_id: str, profile: b.BillingProfile, caller: d.Caller
                          ) -> b.BillingProfile:
        """Validates (every bad field at once) and stores a profile; nothing is written when
        a field is bad."""
        d.raise_if([d.check_id("request_id", request_id)])
        b.validate_profile(profile)
        return await self.store.set_profile(request_id, profile, caller)

    async def delete_profile(self, request_id: str, org_id: str, caller: d.Caller) -> None:
        """Removes an org's profile."""
        d.raise_if([d.check_id("request_id", request_id), d.check_id("org_id", org_id)])
        await self.store.delete_profile(request_id, org_id, caller)

    async def set_settings(self, request_id: str, settings: b.BillingSettings,
                           caller: d.Caller) -> b.BillingSettings:
        """Stores an org's billing settings."""
        d.raise_if([d.check_id("request_id", request_id),
                    d.check_id("settings.org_id", settings.org_id)])
        return await self.store.set_settings(request_id, settings, caller)

    async def publish_rates(self, request_id: str, rates_ppm: dict[str, int],
                            effective_from: datetime | None, caller: d.Caller
                            ) -> tax.TaxRateTable:
        """Validates and publishes a new version of the tax rates."""
        d.raise_if([d.check_id("request_id", request_id)])
        tax.validate_rates(rates_ppm)
        return await self.store.publish_rates(request_id, rates_ppm, effective_from, caller)

    async def reconcile(self, org_id: str, month_text: str) -> reconcile.Reconciliation:
        """One month reconciled (of one org, or every org when `org_id` is empty)."""
        if org_id:
            d.raise_if([d.check_id("org_id", org_id)])
        month = st.parse_month(month_text, self.store.ledger.clock())
        async with self.store.pool.acquire() as conn:
            return await reconcile.reconcile(conn, st.start_of(month),
                                             st.start_of(st.next_month(month)), org_id,
                                             self.itemizer)
