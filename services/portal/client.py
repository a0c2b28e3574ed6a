"""Every gRPC call the portal makes, in one place.

Calls are made for a signed-in person (`Caller`): their access token is forwarded, so a
service that verifies credentials decides on them again, and `x-tally-actor` names them. Before
any call leaves, the request is checked against the policy table (tally.kit.policy) with the
very guard the services run (`Guard.check`), from the person's memberships as accounts'
credentials feed reports them — so a page or a forged form gets the same answer the RPC would
give, and the portal has no second policy. The portal's own identity is used only to follow
that feed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from google.protobuf.timestamp_pb2 import Timestamp

from tally.accounts.v1 import accounts_pb2 as apb
from tally.common.v1 import common_pb2 as cpb
from tally.kit import policy
from tally.kit.auth import CredentialCache, Guard, permission_denied
from tally.kit.channels import peer_channel
from tally.kit.errors import Reason, TallyError
from tally.kit.server import Principal
from tally.ledger.v1 import billing_pb2 as bpb
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.metering.v1 import metering_pb2 as mpb
from tally.notifier.v1 import notifier_pb2 as npb
from tally.pricing.v1 import pricing_pb2 as ppb
from tally.sdk.client import TallyClient

from .domain import UsageRange

MAX_EXPORT_PAGES: Final = 50
"""A chart reads at most this many pages of 1000 roll-up rows."""
ROLES: Final = {"owner": apb.ROLE_OWNER, "admin": apb.ROLE_ADMIN, "billing": apb.ROLE_BILLING,
                "developer": apb.ROLE_DEVELOPER, "viewer": apb.ROLE_VIEWER,
                "gateway": apb.ROLE_GATEWAY}

_L = "/tally.ledger.v1.LedgerService/"
_B = "/tally.ledger.v1.BillingService/"
_M = "/tally.metering.v1.MeteringService/"
_N = "/tally.notifier.v1.NotifierService/"
_A = "/tally.accounts.v1.AccountsService/"
_P = "/tally.pricing.v1.PricingService/"


@dataclass(frozen=True, slots=True)
class Caller:
    """A signed-in person as the services see them."""

    subject: str
    access_token: str = ""

    @property
    def actor(self) -> str:
        return f"user:{self.subject}"

    def metadata(self) -> tuple[tuple[str, str], ...]:
        found = [("x-tally-actor", self.actor)]
        if self.access_token:
            found.append(("authorization", f"Bearer {self.access_token}"))
        return tuple(found)

    def context(self, org_id: str) -> cpb.RequestContext:
        return cpb.RequestContext(org_id=org_id, actor=self.actor)


class PortalClient:
    """The services, for the portal."""

    def __init__(self, addresses: Mapping[str, str]) -> None:
        # channels are made in `start`, on the loop that serves (uvicorn makes its own)
        self._addresses = dict(addresses)
        self._tally: TallyClient | None = None
        self.cache = CredentialCache()
        self.guard = Guard(self.cache)
        self._stop = asyncio.Event()
        self._follow: asyncio.Future[Any] | None = None

    async def start(self, ready_timeout_s: float = 10.0) -> None:
        """Opens the channels and follows accounts' credentials feed (memberships) until
        `stop`."""
        from tally.kit import tls

        # mutual TLS with the portal's certificate when the services serve only TLS (no mesh)
        files = tls.client_files()
        self._tally = TallyClient(self._addresses, actor="service:portal",
                                  channel_credentials=(tls.channel_credentials(files)
                                                       if files is not None else None))
        channel = peer_channel(self._addresses["accounts"])

        async def follow() -> None:
            try:
                await self.cache.follow(channel, self._stop)
            finally:
                await channel.close()

        self._follow = asyncio.ensure_future(follow())
        try:
            await asyncio.wait_for(self.cache.ready.wait(), ready_timeout_s)
        except TimeoutError:
            pass  # pages answer "not a member" until the feed arrives

    async def stop(self) -> None:
        self._stop.set()
        if self._follow is not None:
            await self._follow
        if self._tally is not None:
            await self._tally.close()

    @property
    def tally(self) -> TallyClient:
        if self._tally is None:
            raise RuntimeError("PortalClient.start was not called")
        return self._tally

    # --- the policy table ------------------------------------------------------------

    def principal(self, who: Caller) -> Principal:
        """The person with their memberships, as the services' guard builds it."""
        return Principal(identity=who.actor, verified_by="oidc",
                         org_roles=self.cache.roles_of(who.subject))

    def orgs(self, who: Caller) -> dict[str, frozenset[str]]:
        """The orgs the person is a member of, and their roles there."""
        return self.cache.roles_of(who.subject)

    def can(self, who: Caller, method: str, org_id: str) -> bool:
        """Whether the policy table lets the person call `method` (short name, e.g.
        `ledger.Purchase`) for `org_id`."""
        rule = policy.POLICY[_full(method)]
        return bool(rule.roles & self.principal(who).roles_in(org_id))

    def require(self, who: Caller, method: str, org_id: str) -> None:
        """PERMISSION_DENIED, as the guard words it, unless the table lets the person call
        `method` in `org_id`: checked before a form's fields, so a forged form from a role
        that may not act is refused 403 whatever it carries."""
        if not self.can(who, method, org_id):
            full = _full(method)
            raise permission_denied(policy.POLICY[full], full, self.principal(who), org_id)

    def _check(self, who: Caller, method: str, request: Any) -> Any:
        self.guard.check(self.principal(who), _full(method), request)
        return request

    def key_roles(self, who: Caller, org_id: str) -> list[str]:
        """The API-key roles the person may create, rotate and revoke in `org_id` (the table's
        rule accounts enforces: never a key stronger than oneself)."""
        held = self.principal(who).roles_in(org_id)
        return [r for r in KEY_ROLES if policy.may_manage_key_role(held, r)]

    def _check_key_role(self, who: Caller, org_id: str, role: str) -> None:
        if role not in self.key_roles(who, org_id):
            raise TallyError(Reason.PERMISSION_DENIED,
                             f"role: a key of role {role!r} is stronger than your role; you "
                             f"may manage {', '.join(self.key_roles(who, org_id)) or 'no'} keys",
                             field="role")

    async def _check_key(self, who: Caller, org_id: str, key_id: str) -> None:
        """Refuses a key the person may not manage (looked up only for non-managers)."""
        if self.principal(who).roles_in(org_id) & policy.KEY_MANAGERS:
            return
        for key in await self.api_keys(who, org_id):
            if key.key_id == key_id:
                self._check_key_role(who, org_id, _role_name(key.role))
                return
        raise TallyError(Reason.NOT_FOUND, f"key_id: no key {key_id!r} in org {org_id!r}",
                         field="key_id")

    # --- reads -----------------------------------------------------------------------

    async def balance(self, who: Caller, org: str) -> lpb.Balance:
        """The org's balance; zeros before its first credit opened an account."""
        request = self._check(who, "ledger.GetBalance", lpb.GetBalanceRequest(org_id=org))
        try:
            reply = await self.tally.ledger.GetBalance(request, metadata=who.metadata())
        except TallyError as exc:
            if exc.reason is not Reason.NOT_FOUND:
                raise
            return lpb.Balance(org_id=org)
        return reply.balance

    async def usage_summary(self, who: Caller, org: str, year: int, month: int,
                            group_by: list[Any], label_key: str = ""
                            ) -> mpb.GetUsageSummaryResponse:
        request = self._check(who, "metering.GetUsageSummary", mpb.GetUsageSummaryRequest(
            org_id=org, year=year, month=month, group_by=group_by, label_key=label_key))
        reply: mpb.GetUsageSummaryResponse = await self.tally.metering.GetUsageSummary(
            request, metadata=who.metadata())
        return reply

    async def usage_over_time(self, who: Caller, org: str, span: UsageRange
                              ) -> list[tuple[datetime, int]]:
        """(bucket start, micro-credits) roll-up rows of the range (hourly or daily)."""
        kind = (mpb.EXPORT_KIND_DAILY_SUMMARY if span.bucket == "day"
                else mpb.EXPORT_KIND_HOURLY_SUMMARY)
        found: list[tuple[datetime, int]] = []
        token = ""
        for _ in range(MAX_EXPORT_PAGES):
            request = self._check(who, "metering.ExportUsage", mpb.ExportUsageRequest(
                org_id=org, start_time=_ts(span.start),
                end_time=_ts(span.end), kind=kind, page_size=1000,
                page_token=token, group_by=[mpb.USAGE_GROUP_BY_METER]))
            token = ""
            async for message in self.tally.metering.ExportUsage(request,
                                                                 metadata=who.metadata()):
                if message.HasField("summary"):
                    row = message.summary
                    found.append((row.bucket_start.ToDatetime(tzinfo=UTC),
                                  row.credits_micros))
                token = message.next_page_token or token
            if not token:
                break
        return found

    async def transactions(self, who: Caller, org: str, kinds: list[Any], start: datetime | None,
                           end: datetime | None, page_token: str, page_size: int
                           ) -> lpb.ListTransactionsResponse:
        request = lpb.ListTransactionsRequest(org_id=org, kinds=kinds, page_size=page_size,
                                              page_token=page_token)
        if start is not None:
            request.start_time.CopyFrom(_ts(start))
        if end is not None:
            request.end_time.CopyFrom(_ts(end))
        self._check(who, "ledger.ListTransactions", request)
        reply: lpb.ListTransactionsResponse = await self.tally.ledger.ListTransactions(
            request, metadata=who.metadata())
        return reply

    async def usage_event(self, who: Caller, org: str, event_id: str
                          ) -> mpb.GetUsageEventResponse:
        request = self._check(who, "metering.GetUsageEvent",
                              mpb.GetUsageEventRequest(org_id=org, event_id=event_id))
        reply: mpb.GetUsageEventResponse = await self.tally.metering.GetUsageEvent(
            request, metadata=who.metadata())
        return reply

    async def budgets(self, who: Caller, org: str) -> list[mpb.Budget]:
        request = self._check(who, "metering.ListBudgets", mpb.ListBudgetsRequest(org_id=org))
        return list((await self.tally.metering.ListBudgets(
            request, metadata=who.metadata())).budgets)

    async def quotas(self, who: Caller, org: str) -> list[mpb.Quota]:
        request = self._check(who, "metering.ListQuotas", mpb.ListQuotasRequest(org_id=org))
        return list((await self.tally.metering.ListQuotas(
            request, metadata=who.metadata())).quotas)

    async def alert_rules(self, who: Caller, org: str) -> list[npb.AlertRule]:
        request = self._check(who, "notifier.ListAlertRules",
                              npb.ListAlertRulesRequest(org_id=org))
        return list((await self.tally.notifier.ListAlertRules(
            request, metadata=who.metadata())).rules)

    async def invoices(self, who: Caller, org: str) -> list[bpb.BillingDocument]:
        request = self._check(who, "billing.ListInvoices",
                              bpb.ListInvoicesRequest(org_id=org, page_size=100))
        return list((await self.tally.billing.ListInvoices(
            request, metadata=who.metadata())).invoices)

    async def invoice_pdf(self, who: Caller, org: str, invoice_id: str) -> tuple[str, bytes]:
        """The document's file name and PDF bytes."""
        request = self._check(who, "billing.DownloadInvoicePdf", bpb.DownloadInvoicePdfRequest(
            org_id=org, invoice_id=invoice_id))
        name, chunks = f"{invoice_id}.pdf", []
        async for part in self.tally.billing.DownloadInvoicePdf(request,
                                                                metadata=who.metadata()):
            name = part.file_name or name
            chunks.append(part.chunk)
        return name, b"".join(chunks)

    async def api_keys(self, who: Caller, org: str) -> list[apb.ApiKey]:
        request = self._check(who, "accounts.ListApiKeys",
                              apb.ListApiKeysRequest(org_id=org, page_size=200))
        return list((await self.tally.accounts.ListApiKeys(
            request, metadata=who.metadata())).keys)

    async def members(self, who: Caller, org: str) -> list[apb.Member]:
        request = self._check(who, "accounts.ListMembers",
                              apb.ListMembersRequest(org_id=org, page_size=500))
        return list((await self.tally.accounts.ListMembers(
            request, metadata=who.metadata())).members)

    async def seats(self, who: Caller, org: str) -> apb.GetSeatUsageResponse:
        request = self._check(who, "accounts.GetSeatUsage",
                              apb.GetSeatUsageRequest(org_id=org))
        reply: apb.GetSeatUsageResponse = await self.tally.accounts.GetSeatUsage(
            request, metadata=who.metadata())
        return reply

    async def packages(self, who: Caller) -> list[ppb.CreditPackage]:
        request = self._check(who, "pricing.ListCreditPackages",
                              ppb.ListCreditPackagesRequest())
        return [p for p in (await self.tally.pricing.ListCreditPackages(
            request, metadata=who.metadata())).packages if not p.manual_settlement_only]

    async def order(self, who: Caller, org: str, order_id: str) -> lpb.PaymentOrder:
        request = self._check(who, "ledger.GetPaymentOrder", lpb.GetPaymentOrderRequest(
            org_id=org, payment_order_id=order_id))
        return (await self.tally.ledger.GetPaymentOrder(request,
                                                         metadata=who.metadata())).order

    async def orders(self, who: Caller, org: str) -> list[lpb.PaymentOrder]:
        request = self._check(who, "ledger.ListPaymentOrders",
                              lpb.ListPaymentOrdersRequest(org_id=org, page_size=50))
        return list((await self.tally.ledger.ListPaymentOrders(
            request, metadata=who.metadata())).orders)

    async def auto_top_up(self, who: Caller, org: str) -> lpb.AutoTopUp | None:
        request = self._check(who, "ledger.GetAutoTopUp", lpb.GetAutoTopUpRequest(org_id=org))
        try:
            reply = await self.tally.ledger.GetAutoTopUp(request, metadata=who.metadata())
        except TallyError as exc:
            if exc.reason is Reason.NOT_FOUND:
                return None
            raise
        return reply.auto_top_up if reply.HasField("auto_top_up") else None

    async def balance_changes(self, who: Caller, org: str) -> AsyncIterator[npb.Notification]:
        """The org's notifications that move its balance, live, from the notifier."""
        request = self._check(who, "notifier.Subscribe", npb.SubscribeRequest(
            org_id=org, types=[npb.NOTIFICATION_TYPE_BALANCE_CHANGED,
                               npb.NOTIFICATION_TYPE_PAYMENT_SUCCEEDED,
                               npb.NOTIFICATION_TYPE_BILLING_STATE_CHANGED]))
        async for message in self.tally.notifier.Subscribe(request, metadata=who.metadata()):
            yield message.notification

    # --- changes ---------------------------------------------------------------------

    async def purchase(self, who: Caller, org: str, order_id: str, package_id: str,
                       success_url: str, cancel_url: str) -> lpb.PaymentOrder:
        request = self._check(who, "ledger.Purchase", lpb.PurchaseRequest(
            payment_order_id=order_id, context=who.context(org), org_id=org,
            package_id=package_id, success_url=success_url, cancel_url=cancel_url))
        return (await self.tally.ledger.Purchase(request, metadata=who.metadata())).order

    async def set_auto_top_up(self, who: Caller, org: str, setting: lpb.AutoTopUp
                              ) -> lpb.AutoTopUp:
        setting.org_id = org
        request = self._check(who, "ledger.SetAutoTopUp", lpb.SetAutoTopUpRequest(
            request_id=uuid.uuid4().hex, context=who.context(org), auto_top_up=setting))
        return (await self.tally.ledger.SetAutoTopUp(request,
                                                      metadata=who.metadata())).auto_top_up

    async def create_api_key(self, who: Caller, org: str, request_id: str, name: str,
                             role: str) -> apb.CreateApiKeyResponse:
        request = self._check(who, "accounts.CreateApiKey", apb.CreateApiKeyRequest(
            context=who.context(org), request_id=request_id, org_id=org,
            role=ROLES.get(role, apb.ROLE_UNSPECIFIED), name=name))
        self._check_key_role(who, org, role)
        reply: apb.CreateApiKeyResponse = await self.tally.accounts.CreateApiKey(
            request, metadata=who.metadata())
        return reply

    async def rotate_api_key(self, who: Caller, org: str, request_id: str, key_id: str
                             ) -> apb.RotateApiKeyResponse:
        request = self._check(who, "accounts.RotateApiKey", apb.RotateApiKeyRequest(
            context=who.context(org), request_id=request_id, org_id=org, key_id=key_id,
            overlap_seconds=3600))
        await self._check_key(who, org, key_id)
        reply: apb.RotateApiKeyResponse = await self.tally.accounts.RotateApiKey(
            request, metadata=who.metadata())
        return reply

    async def turn_on_live_balance(self, who: Caller, org: str) -> npb.AlertRule:
        """A Subscribe-only (stream channel) rule for balance changes: what the overview's
        live balance listens to."""
        request = self._check(who, "notifier.CreateAlertRule", npb.CreateAlertRuleRequest(
            request_id=f"portal-live-balance-{org}", context=who.context(org),
            rule=npb.AlertRule(org_id=org, types=[npb.NOTIFICATION_TYPE_BALANCE_CHANGED],
                               channel=npb.CHANNEL_STREAM, enabled=True)))
        return (await self.tally.notifier.CreateAlertRule(request,
                                                          metadata=who.metadata())).rule

    async def revoke_api_key(self, who: Caller, org: str, key_id: str) -> apb.ApiKey:
        request = self._check(who, "accounts.RevokeApiKey", apb.RevokeApiKeyRequest(
            context=who.context(org), org_id=org, key_id=key_id))
        await self._check_key(who, org, key_id)
        return (await self.tally.accounts.RevokeApiKey(request, metadata=who.metadata())).key


    # --- members -------------------------------------------------------------------

    async def invite_member(self, who: Caller, org: str, subject: str, role: str) -> apb.Member:
        request = self._check(who, "accounts.InviteMember", apb.InviteMemberRequest(
            context=who.context(org), org_id=org, subject=subject,
            role=ROLES.get(role, apb.ROLE_UNSPECIFIED)))
        return (await self.tally.accounts.InviteMember(request, metadata=who.metadata())).member

    async def change_member_role(self, who: Caller, org: str, subject: str, role: str
                                 ) -> apb.Member:
        request = self._check(who, "accounts.ChangeMemberRole", apb.ChangeMemberRoleRequest(
            context=who.context(org), org_id=org, subject=subject,
            role=ROLES.get(role, apb.ROLE_UNSPECIFIED)))
        return (await self.tally.accounts.ChangeMemberRole(request,
                                                           metadata=who.metadata())).member

    async def remove_member(self, who: Caller, org: str, subject: str) -> bool:
        request = self._check(who, "accounts.RemoveMember", apb.RemoveMemberRequest(
            context=who.context(org), org_id=org, subject=subject))
        return bool((await self.tally.accounts.RemoveMember(request,
                                                            metadata=who.metadata())).removed)

    # --- statements ----------------------------------------------------------------

    async def statements(self, who: Caller, org: str) -> list[bpb.Statement]:
        request = self._check(who, "billing.ListStatements",
                              bpb.ListStatementsRequest(org_id=org, page_size=36))
        return list((await self.tally.billing.ListStatements(
            request, metadata=who.metadata())).statements)

    async def statement(self, who: Caller, org: str, month: str) -> bpb.Statement:
        request = self._check(who, "billing.GetStatement",
                              bpb.GetStatementRequest(org_id=org, month=month))
        return (await self.tally.billing.GetStatement(request,
                                                      metadata=who.metadata())).statement

    async def statement_pdf(self, who: Caller, org: str, month: str) -> tuple[str, bytes]:
        """The statement's file name and PDF bytes."""
        request = self._check(who, "billing.DownloadStatementPdf",
                              bpb.DownloadStatementPdfRequest(org_id=org, month=month))
        name, chunks = f"statement-{org}-{month}.pdf", []
        async for part in self.tally.billing.DownloadStatementPdf(request,
                                                                  metadata=who.metadata()):
            name = part.file_name or name
            chunks.append(part.chunk)
        return name, b"".join(chunks)

    # --- alert rules -----------------------------------------------------------------

    async def create_alert_rule(self, who: Caller, org: str, request_id: str,
                                rule: npb.AlertRule) -> npb.AlertRule:
        rule.org_id = org
        request = self._check(who, "notifier.CreateAlertRule", npb.CreateAlertRuleRequest(
            request_id=request_id, context=who.context(org), rule=rule))
        return (await self.tally.notifier.CreateAlertRule(request,
                                                          metadata=who.metadata())).rule

    async def update_alert_rule(self, who: Caller, org: str, request_id: str,
                                rule: npb.AlertRule) -> npb.AlertRule:
        rule.org_id = org
        request = self._check(who, "notifier.UpdateAlertRule", npb.UpdateAlertRuleRequest(
            request_id=request_id, context=who.context(org), rule=rule))
        return (await self.tally.notifier.UpdateAlertRule(request,
                                                          metadata=who.metadata())).rule

    async def delete_alert_rule(self, who: Caller, org: str, request_id: str,
                                rule_id: str) -> None:
        request = self._check(who, "notifier.DeleteAlertRule", npb.DeleteAlertRuleRequest(
            request_id=request_id, context=who.context(org), org_id=org, rule_id=rule_id))
        await self.tally.notifier.DeleteAlertRule(request, metadata=who.metadata())

    # --- custom purchases ------------------------------------------------------------

    async def custom_prices(self, who: Caller) -> dict[str, str]:
        """Currency -> price of one credit in minor units, for custom amounts (the price
        book's; empty when it sells none)."""
        request = self._check(who, "pricing.GetPriceBook", ppb.GetPriceBookRequest())
        book = (await self.tally.pricing.GetPriceBook(request, metadata=who.metadata())).book
        return dict(book.custom_credit_price_minor)

    async def purchase_custom(self, who: Caller, org: str, order_id: str, amount_minor: int,
                              currency: str, success_url: str, cancel_url: str
                              ) -> lpb.PaymentOrder:
        request = self._check(who, "ledger.Purchase", lpb.PurchaseRequest(
            payment_order_id=order_id, context=who.context(org), org_id=org,
            custom=lpb.CustomAmount(amount_minor=amount_minor, currency=currency),
            success_url=success_url, cancel_url=cancel_url))
        return (await self.tally.ledger.Purchase(request, metadata=who.metadata())).order


KEY_ROLES: Final = ("gateway", "developer", "viewer", "billing", "admin")
"""Roles an API key may have (never owner: ownership stays with people)."""


def _role_name(role: int) -> str:
    for name, number in ROLES.items():
        if number == role:
            return name
    return "unknown"


def _full(method: str) -> str:
    service, _, name = method.partition(".")
    prefix = {"ledger": _L, "billing": _B, "metering": _M, "notifier": _N, "accounts": _A,
              "pricing": _P}[service]
    return prefix + name


def _ts(at: datetime) -> Timestamp:
    stamp = Timestamp()
    stamp.FromDatetime(at)
    return stamp
