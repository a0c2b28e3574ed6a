"""The whole suite in process for portal tests: accounts, pricing, ledger (with the local
payment provider and its checkout pages), metering, notifier — real servers on real
PostgreSQL — plus the test OIDC provider and the portal itself, and an org with one member of
each role and some real usage."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx

from services.accounts.server import AccountsConfig
from services.accounts.server import build as build_accounts
from services.ledger.payments.local_provider import LocalProvider
from services.ledger.server import LedgerConfig
from services.ledger.server import build as build_ledger
from services.metering.server import build as build_metering
from services.notifier.server import build as build_notifier
from services.portal.config import PortalConfig
from services.portal.server import RunningPortal, start_portal
from services.pricing.server import build as build_pricing
from tally.accounts.v1 import accounts_pb2 as apb
from tally.common.v1 import common_pb2 as cpb
from tally.kit.config import KitConfig, load_kit_config
from tally.kit.infra import free_port
from tally.kit.server import RunningServer, start_server
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.metering.v1 import metering_pb2 as mpb
from tally.notifier.v1 import notifier_pb2 as npb
from tally.pricing.v1 import pricing_pb2 as ppb
from tally.rating import load_catalog
from tally.sdk.client import TallyClient
from tally.sdk.pricebook import to_proto
from tests.support.oidc_provider import OidcProvider

ORG = "portal-org"
OTHER_ORG = "other-org"
SECRET = "whsec_portal_test_secret"
CREDIT = 1_000_000
PEOPLE = {"owner": "olivia", "admin": "ada", "billing": "bill", "developer": "dev",
          "viewer": "vera"}
MODEL = "claude-sonnet"


@dataclass
class Suite:
    """What portal tests talk to."""

    tally: TallyClient
    """As the platform's operator (development mode trusts the named actor)."""
    provider: LocalProvider
    oidc: OidcProvider
    portal: RunningPortal
    servers: list[RunningServer]
    config: KitConfig
    portal_settings: PortalConfig

    @property
    def url(self) -> str:
        return self.portal.url

    async def balance(self, org: str = ORG) -> lpb.Balance:
        return (await self.tally.ledger.GetBalance(lpb.GetBalanceRequest(org_id=org))).balance


async def _serve(config: KitConfig, name: str, app: object) -> RunningServer:
    return await start_server(app, port=config.port_of(name))  # type: ignore[arg-type]


@asynccontextmanager
async def open_suite(db_url: str, redis_url: str | None = None) -> AsyncIterator[Suite]:
    """Every service, the OIDC provider and the portal, with ORG seeded; with `redis_url` the
    portal keeps its sessions in Redis (as replicas do)."""
    config = dataclasses.replace(
        load_kit_config({}), database_url=db_url, migrate_on_start=False, db_pool_size=8,
        redis_url=redis_url,
        **{f"{s}_port": free_port() for s in ("pricing", "metering", "ledger", "notifier",
                                               "accounts")})
    oidc = await OidcProvider().start()
    provider = LocalProvider(secrets=[SECRET], retry_first_s=0.02, retry_max_s=0.2,
                             max_attempts=8)
    servers: list[RunningServer] = []
    portal: RunningPortal | None = None
    tally = TallyClient({s: config.address_of(s) for s in
                         ("pricing", "metering", "ledger", "notifier", "accounts")},
                        actor="user:test-operator")
    try:
        servers.append(await _serve(config, "accounts", await build_accounts(
            config, AccountsConfig(regions=frozenset({"local"})))))
        servers.append(await _serve(config, "pricing", await build_pricing(config)))
        await tally.pricing.PublishPriceBook(ppb.PublishPriceBookRequest(
            request_id="portal-catalog", draft=_catalog(),
            context=cpb.RequestContext(actor="user:pricing-admin")))
        servers.append(await _serve(config, "ledger", await build_ledger(
            config, LedgerConfig(webhook_port=0, checkout_port=0, webhook_secrets=(SECRET,),
                                 top_up_poll_ms=20), provider=provider)))
        servers.append(await _serve(config, "metering", await build_metering(config)))
        servers.append(await _serve(config, "notifier", await build_notifier(config)))
        await seed(tally)
        port = free_port()
        oidc.register("tally", f"http://127.0.0.1:{port}/auth/callback")
        # the public URL every replica of this portal shares (the OIDC redirect names it)
        settings = PortalConfig(oidc_issuer=oidc.issuer, oidc_client_id="tally",
                                public_url=f"http://127.0.0.1:{port}")
        portal = await start_portal(config, settings, port)
        await _members_known(portal)
        yield Suite(tally, provider, oidc, portal, servers, config, settings)
    finally:
        if portal is not None:
            await portal.stop()
        await tally.close()
        for server in reversed(servers):
            await server.stop()
        await oidc.stop()


def _catalog() -> ppb.PriceBook:
    draft = to_proto(load_catalog())
    draft.version = 0
    draft.ClearField("effective_from")
    draft.custom_credit_price_minor["USD"] = "1"  # custom amounts: one cent a credit
    return draft


@asynccontextmanager
async def another_replica(suite: Suite) -> AsyncIterator[RunningPortal]:
    """A second portal process-alike on its own port, configured as the first (same public
    URL, same Redis): what a second pod behind the load balancer is."""
    replica = await start_portal(suite.config, suite.portal_settings, free_port())
    try:
        await _members_known(replica)
        yield replica
    finally:
        await replica.stop()


async def _members_known(portal: RunningPortal) -> None:
    """Waits until the portal's copy of the credentials feed has every seeded member."""
    cache = portal.server.config.app.state.portal.client.cache
    for _ in range(500):
        if all(ORG in cache.roles_of(p) for p in PEOPLE.values()):
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the portal never saw the seeded members")


async def seed(tally: TallyClient) -> None:
    """ORG with one member per role, a promotional grant, a budget, a quota, a stream alert
    rule for balance changes, and a few metered requests over three days; OTHER_ORG with its
    own owner and credit."""
    await tally.accounts.CreateOrg(apb.CreateOrgRequest(
        org_id=ORG, name="Portal Org", region="local", seat_limit=10,
        owner_subject=PEOPLE["owner"]))
    await tally.accounts.CreateOrg(apb.CreateOrgRequest(
        org_id=OTHER_ORG, name="Other Org", region="local", seat_limit=3,
        owner_subject="mallory"))
    roles = {"admin": apb.ROLE_ADMIN, "billing": apb.ROLE_BILLING,
             "developer": apb.ROLE_DEVELOPER, "viewer": apb.ROLE_VIEWER}
    for role, number in roles.items():
        await tally.accounts.InviteMember(apb.InviteMemberRequest(
            org_id=ORG, subject=PEOPLE[role], role=number,
            context=cpb.RequestContext(org_id=ORG, actor="user:olivia")))
    for org, amount in ((ORG, 500), (OTHER_ORG, 77)):
        await tally.ledger.Transfer(lpb.TransferRequest(
            transfer_id=f"grant-{org}", org_id=org, kind=lpb.TRANSFER_KIND_PROMOTIONAL_GRANT,
            amount_micros=amount * CREDIT, reason="welcome credit",
            context=cpb.RequestContext(org_id=org, actor="user:finance")))
    await tally.notifier.CreateAlertRule(npb.CreateAlertRuleRequest(
        request_id="portal-live", context=cpb.RequestContext(org_id=ORG),
        rule=npb.AlertRule(org_id=ORG, types=[npb.NOTIFICATION_TYPE_BALANCE_CHANGED],
                           channel=npb.CHANNEL_STREAM, enabled=True)))
    await tally.metering.CreateBudget(mpb.CreateBudgetRequest(
        request_id="portal-budget", context=cpb.RequestContext(org_id=ORG),
        budget=mpb.Budget(org_id=ORG, name="Monthly cap", scope=mpb.BUDGET_SCOPE_ORG,
                          period=mpb.BUDGET_PERIOD_MONTHLY, limit_micros=100 * CREDIT,
                          alarm_thresholds_percent=[80],
                          enforcement=mpb.BUDGET_ENFORCEMENT_HARD)))
    await tally.metering.CreateQuota(mpb.CreateQuotaRequest(
        request_id="portal-quota", context=cpb.RequestContext(org_id=ORG),
        quota=mpb.Quota(org_id=ORG, scope=mpb.QUOTA_SCOPE_ORG,
                        kind=mpb.QUOTA_KIND_REQUESTS_PER_SECOND, limit=50, burst=10,
                        enforcement=mpb.QUOTA_ENFORCEMENT_HARD)))
    now = datetime.now(UTC)
    events = []
    for i in range(6):
        event = mpb.UsageEvent(
            event_id=f"portal-evt-{i}", model=MODEL, operation=mpb.OPERATION_CHAT,
            context=cpb.RequestContext(org_id=ORG, project_id="search" if i % 2 else "chat",
                                       labels={"team": "alpha" if i < 4 else "beta"}),
            quantities=[cpb.MeterQuantity(meter=cpb.METER_INPUT_TOKENS, quantity=20_000),
                        cpb.MeterQuantity(meter=cpb.METER_OUTPUT_TOKENS, quantity=4_000)])
        event.occurred_at.FromDatetime(now - timedelta(hours=1 + 20 * (i % 3)))
        events.append(event)

    async def one_batch() -> AsyncIterator[mpb.StreamUsageRequest]:
        yield mpb.StreamUsageRequest(batch_id="portal-seed", events=events)

    acks = [ack async for ack in tally.metering.StreamUsage(one_batch())]
    results = [r for ack in acks for r in ack.results]
    assert len(results) == 6 and all(r.receipt.cost_micros > 0 for r in results), acks


@asynccontextmanager
async def signed_in(suite: Suite, subject: str) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client signed in to the portal as `subject` (see `sign_in_http`)."""
    http = await sign_in_http(suite, subject)
    try:
        yield http
    finally:
        await http.aclose()


async def sign_in_http(suite: Suite, subject: str) -> httpx.AsyncClient:
    """An HTTP client signed in to the portal as `subject` through the OIDC provider's
    authorization code flow (no browser)."""
    http = httpx.AsyncClient(base_url=suite.url, follow_redirects=False, timeout=15.0)
    to_provider = await http.get("/sign-in?next=/")
    assert to_provider.status_code == 303, to_provider.text
    authorize = httpx.URL(to_provider.headers["location"])
    form = dict(authorize.params)
    form["username"] = subject
    async with httpx.AsyncClient(timeout=15.0) as provider_http:
        approved = await provider_http.post(f"{suite.oidc.issuer}/authorize", data=form)
    assert approved.status_code == 302, approved.text
    back = httpx.URL(approved.headers["location"])
    done = await http.get(f"/auth/callback?{back.query.decode()}")
    assert done.status_code == 303, done.text
    return http


def csrf_of(html: str) -> str:
    """The CSRF token a page's forms carry."""
    marker = 'name="csrf_token" value="'
    start = html.index(marker) + len(marker)
    return html[start:html.index('"', start)]


def field_of(html: str, name: str) -> str:
    """The value of the first hidden field `name` on a page."""
    marker = f'name="{name}" value="'
    start = html.index(marker) + len(marker)
    return html[start:html.index('"', start)]
