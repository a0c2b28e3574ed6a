"""`tally demo`: a short workload against the running suite, one story a person can follow.

It asks each service one question, buys credit the way a customer does (Purchase -> the
hosted checkout page, paid with the local provider's test card -> the provider's signed
webhook -> credit), walks the ledger through its primitives (credit granted -> reserved ->
captured at its actual cost -> usage batch debited -> balance and hash chain verified), then
runs one metered AI request end to end: Authorize holds the worst case -> the usage event
streams in -> its receipt -> the hold is captured.
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

import httpx
import typer

from tally.accounts.v1 import accounts_pb2 as apb
from tally.cli import suite
from tally.cli.payments import TEST_CARD, pay_checkout
from tally.common.v1 import common_pb2 as cpb
from tally.kit.config import KitConfig
from tally.kit.errors import Reason, TallyError
from tally.kit.money import format_credits, format_money, parse_credits
from tally.ledger.v1 import billing_pb2 as bpb
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.metering.v1 import metering_pb2 as mpb
from tally.notifier.v1 import notifier_pb2 as npb
from tally.pricing.v1 import pricing_pb2 as ppb
from tally.sdk.client import TallyClient

PURCHASE_PACKAGE: Final = "individual-20"
PAYMENT_CONFIRM_TIMEOUT_S: Final = 30.0
"""How long the demo waits for the provider's webhook to credit a paid checkout."""
PAYMENT_POLL_INTERVAL_S: Final = 0.1


def _say(label: str, text: str) -> None:
    typer.echo(f"  {label:<28} {text}")


async def run(config: KitConfig, org: str) -> bool:
    """Runs the demo; False if any service did not answer as expected."""
    typer.echo("health:")
    healthy = True
    for service in suite.SERVICES:
        state = await suite.health_state(config.address_of(service))
        _say(service, state)
        healthy &= state == "SERVING"
    if not healthy:
        typer.echo("not every service is SERVING; start the suite with: tally up", err=True)
        return False
    run_id = uuid.uuid4().hex[:8]
    async with TallyClient.from_config(config, actor="user:demo") as tally:
        try:
            await _one_call_each(tally, org)
            await _purchase(tally, f"{org}-{run_id}", run_id)
            await _documents(tally, f"{org}-{run_id}", run_id, config.data_dir / "demo")
            await _ledger_story(tally, f"{org}-{run_id}", run_id)
            await _metered_request(tally, f"{org}-{run_id}", run_id)
            await _demo_org_in_accounts(tally, f"{org}-{run_id}", run_id)
            if suite.gateway_running(config):
                await _through_the_gateway(config, tally, f"{org}-{run_id}", run_id)
            else:
                typer.echo("gateway: not running (start it with: tally up --with-gateway)")
            await _portal(tally, config, f"{org}-{run_id}")
        except TallyError as exc:
            typer.echo(f"demo failed: {exc.reason}: {exc.message}", err=True)
            return False
    typer.echo("demo ok")
    return True


async def _one_call_each(tally: TallyClient, org: str) -> None:
    typer.echo("one call per service:")
    packages = await tally.pricing.ListCreditPackages(ppb.ListCreditPackagesRequest())
    names = ", ".join(p.name for p in packages.packages)
    _say("pricing.ListCreditPackages", f"{len(packages.packages)} packages: {names}")
    summary = await tally.metering.GetUsageSummary(
        mpb.GetUsageSummaryRequest(org_id=org, year=2026, month=11))
    _say("metering.GetUsageSummary", f"{len(summary.rows)} rows for {org} 2026-11")
    rules = await tally.notifier.ListAlertRules(npb.ListAlertRulesRequest(org_id=org))
    _say("notifier.ListAlertRules", f"{len(rules.rules)} rules for {org}")
    report = await tally.ledger.VerifyLedger(lpb.VerifyLedgerRequest())
    _say("ledger.VerifyLedger", f"ok={report.ok}, {report.entries_checked} entries checked")


async def _available(tally: TallyClient, org: str) -> int:
    try:
        balance = (await tally.ledger.GetBalance(lpb.GetBalanceRequest(org_id=org))).balance
    except TallyError as exc:
        if exc.reason is Reason.NOT_FOUND:  # no account before its first credit
            return 0
        raise
    return balance.available_micros


async def _purchase(tally: TallyClient, org: str, run_id: str) -> None:
    """Buys a package as a customer would: checkout page, card, webhook, credit."""
    typer.echo(f"buying credit for {org}:")
    before = await _available(tally, org)
    order = (await tally.ledger.Purchase(lpb.PurchaseRequest(
        payment_order_id=f"demo-purchase-{run_id}", org_id=org,
        context=cpb.RequestContext(org_id=org), package_id=PURCHASE_PACKAGE))).order
    price = format_money(order.amount_minor, order.currency)
    bonus = (f" + {format_credits(order.bonus_credits_micros)} bonus"
             if order.bonus_credits_micros else "")
    state = lpb.PaymentOrderState.Name(order.state).removeprefix("PAYMENT_ORDER_STATE_")
    _say("ledger.Purchase", f"{PURCHASE_PACKAGE}: {price} for "
         f"{format_credits(order.credits_micros)}{bonus} credits, {state}")
    answer = await pay_checkout(order.checkout_url, card=TEST_CARD)
    if not answer.is_accepted:
        raise TallyError(Reason.INTERNAL, f"the checkout page refused the test card: "
                                          f"{answer.detail}")
    _say("checkout page", f"card {TEST_CARD[-4:]} accepted at {order.checkout_url}")
    started = time.monotonic()
    order = await _settled_order(tally, org, order.payment_order_id)
    _say("provider webhook", f"order SUCCEEDED after {time.monotonic() - started:.1f}s "
         f"({order.credit_transfer_id})")
    after = await _available(tally, org)
    _say("balance", f"available {format_credits(before)} -> {format_credits(after)}")


async def _documents(tally: TallyClient, org: str, run_id: str, folder: Path) -> None:
    """The purchase's invoice (issued with the payment) and the month's statement, as PDFs
    written under `folder`, their paths printed."""
    typer.echo(f"billing documents for {org}:")
    order_id = f"demo-purchase-{run_id}"
    found = (await tally.billing.ListInvoices(bpb.ListInvoicesRequest(org_id=org))).invoices
    invoice = next((x for x in found if x.payment_order_id == order_id), None)
    if invoice is None:
        raise TallyError(Reason.INTERNAL, f"order {order_id} was paid without an invoice")
    total = format_money(invoice.gross_minor, invoice.currency)
    tax = format_money(invoice.tax_minor, invoice.currency)
    _say("billing.GetInvoice", f"{invoice.invoice_id}: {total} incl. tax {tax}")
    invoice_pdf = b"".join([part.chunk async for part in tally.billing.DownloadInvoicePdf(
        bpb.DownloadInvoicePdfRequest(org_id=org, invoice_id=invoice.invoice_id))])
    path = await asyncio.to_thread(_save, folder, f"{invoice.invoice_id}.pdf", invoice_pdf)
    _say("invoice PDF", str(path))
    month = datetime.now(UTC).strftime("%Y-%m")
    statement = (await tally.billing.GetStatement(bpb.GetStatementRequest(
        org_id=org, month=month))).statement
    _say("billing.GetStatement", f"{month}: opening "
         f"{format_credits(statement.opening_balance_micros)} -> closing "
         f"{format_credits(statement.closing_balance_micros)} credits")
    statement_pdf = b"".join([part.chunk async for part in tally.billing.DownloadStatementPdf(
        bpb.DownloadStatementPdfRequest(org_id=org, month=month))])
    path = await asyncio.to_thread(_save, folder, f"statement-{org}-{month}.pdf",
                                   statement_pdf)
    _say("statement PDF", str(path))


def _save(folder: Path, name: str, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(data)
    return path.resolve()


async def _settled_order(tally: TallyClient, org: str, order_id: str) -> lpb.PaymentOrder:
    """Polls the order until the webhook settles it (bounded by PAYMENT_CONFIRM_TIMEOUT_S)."""
    deadline = time.monotonic() + PAYMENT_CONFIRM_TIMEOUT_S
    while True:
        order = (await tally.ledger.GetPaymentOrder(lpb.GetPaymentOrderRequest(
            org_id=org, payment_order_id=order_id))).order
        if order.state == lpb.PAYMENT_ORDER_STATE_SUCCEEDED:
            return order
        state = lpb.PaymentOrderState.Name(order.state).removeprefix("PAYMENT_ORDER_STATE_")
        if order.state != lpb.PAYMENT_ORDER_STATE_PENDING:
            raise TallyError(Reason.INTERNAL, f"order {order_id} ended {state}: "
                                              f"{order.failure_reason or 'no reason given'}")
        if time.monotonic() > deadline:
            raise TallyError(Reason.UNAVAILABLE, (
                f"order {order_id} still {state} {PAYMENT_CONFIRM_TIMEOUT_S:.0f}s after "
                "payment: the provider's webhook did not reach the ledger (see the ledger's "
                "log)"))
        await asyncio.sleep(PAYMENT_POLL_INTERVAL_S)


async def _ledger_story(tally: TallyClient, org: str, run_id: str) -> None:
    typer.echo(f"ledger walk-through for {org}:")
    granted = await tally.ledger.Transfer(lpb.TransferRequest(
        transfer_id=f"demo-grant-{run_id}", org_id=org,
        kind=lpb.TRANSFER_KIND_PROMOTIONAL_GRANT, amount_micros=parse_credits("25"),
        reason="welcome credit"))
    _say("promotional grant", f"available {format_credits(granted.balance_after.available_micros)}")
    held = await tally.ledger.Reserve(lpb.ReserveRequest(
        reservation_id=f"demo-res-{run_id}", org_id=org, amount_micros=parse_credits("2.5"),
        ttl_seconds=60))
    _say("reserve 2.5 for a request", f"available {format_credits(held.available_micros)}")
    captured = await tally.ledger.Capture(lpb.CaptureRequest(
        reservation_id=f"demo-res-{run_id}", org_id=org, actual_micros=parse_credits("1.75")))
    _say("capture actual cost 1.75",
         f"available {format_credits(captured.balance_after.available_micros)}")
    items = [lpb.UsageItem(event_id=f"demo-evt-{run_id}-{i}", org_id=org,
                           cost_micros=parse_credits("0.125")) for i in range(8)]
    posted = await tally.ledger.PostUsageBatch(
        lpb.PostUsageBatchRequest(batch_id=f"demo-batch-{run_id}", items=items))
    _say("usage batch of 8 x 0.125",
         f"available {format_credits(posted.results[-1].balance_after_micros)}")
    balance = (await tally.ledger.GetBalance(lpb.GetBalanceRequest(org_id=org))).balance
    _say("balance", f"posted {format_credits(balance.posted_micros)}, held "
         f"{format_credits(balance.held_micros)}, available "
         f"{format_credits(balance.available_micros)}")
    report = await tally.ledger.VerifyLedger(lpb.VerifyLedgerRequest(org_id=org))
    _say("hash chain", f"ok={report.ok} over {report.entries_checked} entries")
    if not report.ok:
        raise TallyError(Reason.INTERNAL, f"ledger verification failed: {report.detail}")


async def _metered_request(tally: TallyClient, org: str, run_id: str) -> None:
    """The product loop: ask, run, report usage, get a receipt, see the balance."""
    typer.echo(f"one metered AI request for {org}:")
    asked = await tally.metering.Authorize(mpb.AuthorizeRequest(
        request_id=f"demo-req-{run_id}", context=cpb.RequestContext(org_id=org),
        model="claude-sonnet", operation=mpb.OPERATION_CHAT, estimated_input_tokens=3_000,
        max_output_tokens=1_000))
    decision = mpb.Decision.Name(asked.decision).removeprefix("DECISION_")
    _say("metering.Authorize", f"{decision} on {asked.model}, holding "
         f"{format_credits(asked.reserved_micros)} (book v{asked.price_book_version})")
    if asked.decision == mpb.DECISION_DENY:
        raise TallyError(Reason.INTERNAL, f"demo request denied: {asked.deny_reason}")
    event = mpb.UsageEvent(
        event_id=f"demo-usage-{run_id}", model=asked.model, operation=mpb.OPERATION_CHAT,
        reservation_id=asked.reservation_id, context=cpb.RequestContext(org_id=org),
        quantities=[cpb.MeterQuantity(meter=cpb.METER_INPUT_TOKENS, quantity=2_800),
                    cpb.MeterQuantity(meter=cpb.METER_OUTPUT_TOKENS, quantity=640)])
    event.occurred_at.GetCurrentTime()

    async def one_batch() -> AsyncIterator[mpb.StreamUsageRequest]:
        yield mpb.StreamUsageRequest(batch_id="1", events=[event])

    acks = [ack async for ack in tally.metering.StreamUsage(one_batch())]
    receipt = acks[0].results[0].receipt
    lines = ", ".join(f"{cpb.Meter.Name(line.meter).removeprefix('METER_').lower()} "
                      f"{format_credits(line.cost_micros)}" for line in receipt.lines)
    _say("metering.StreamUsage receipt", f"{format_credits(receipt.cost_micros)} ({lines}); "
         f"available after {format_credits(receipt.balance_after_micros)}")
    balance = (await tally.ledger.GetBalance(lpb.GetBalanceRequest(org_id=org))).balance
    # Authorize held the estimate inside metering's credit lease (a ledger reservation for a
    # slice of the org's credit) and the usage event settled it there, so the ledger holds
    # the lease and nothing per request.
    _say("ledger holds", f"{format_credits(balance.held_micros)} = metering's credit lease "
         f"{format_credits(balance.leased_micros)}; available "
         f"{format_credits(balance.available_micros)}")
    if balance.held_micros != balance.leased_micros:
        raise TallyError(Reason.INTERNAL, "the ledger holds credit outside metering's lease")


DEMO_OWNER: Final = "demo-owner"


async def _demo_org_in_accounts(tally: TallyClient, org: str, run_id: str) -> None:
    """The demo org in accounts (its owner, seats, region), which the gateway's API key and
    the portal's members belong to."""
    await tally.accounts.CreateOrg(apb.CreateOrgRequest(
        org_id=org, name=f"Demo {run_id}", region="local", seat_limit=5,
        owner_subject=DEMO_OWNER))


GATEWAY_KEY_WAIT_S: Final = 10.0
"""How long the demo waits for the gateway to learn a new API key from accounts' feed."""


async def _through_the_gateway(config: KitConfig, tally: TallyClient, org: str,
                               run_id: str) -> None:
    """One chat completion through the OpenAI-compatible gateway with an API key of the org:
    the answer, and the receipt the gateway returns in its headers."""
    typer.echo(f"one OpenAI-style request through the gateway for {org}:")
    key = await tally.accounts.CreateApiKey(apb.CreateApiKeyRequest(
        request_id=f"demo-key-{run_id}", org_id=org, role=apb.ROLE_DEVELOPER,
        name="demo app"))
    _say("accounts.CreateApiKey", f"{key.key.prefix}... for {org}")
    url = f"http://{config.host}:{suite.gateway_port()}/v1/chat/completions"
    body = {"model": "gpt-4.1-mini", "max_tokens": 64, "messages": [
        {"role": "user", "content": "In one sentence: what does a credit lease hold?"}]}
    deadline = time.monotonic() + GATEWAY_KEY_WAIT_S
    async with httpx.AsyncClient(timeout=30.0) as http:
        while True:  # the key reaches the gateway over accounts' credentials feed
            reply = await http.post(url, json=body,
                                    headers={"authorization": f"Bearer {key.secret}"})
            if reply.status_code != 401 or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
    if reply.status_code != 200:
        raise TallyError(Reason.INTERNAL, f"gateway answered {reply.status_code}: "
                         f"{reply.text[:300]}")
    answer = reply.json()
    _say("POST /v1/chat/completions", f"{answer['model']}: "
         f"{answer['choices'][0]['message']['content'][:48]}...")
    headers = reply.headers
    _say("receipt headers", f"cost {format_credits(int(headers['x-tally-cost']))}, balance "
         f"{format_credits(int(headers['x-tally-balance']))}, price book "
         f"v{headers['x-tally-price-version']}, request {headers['x-tally-request-id']}")


DEMO_VIEWER: Final = "demo-viewer"
PORTAL_SIGN_IN_TIMEOUT_S: Final = 15.0


async def _portal(tally: TallyClient, config: KitConfig, org: str) -> None:
    """The web portal: the demo org (created in accounts with its owner by
    `_demo_org_in_accounts`) gets a viewer, who signs in (development sign-in, as `tally up`
    runs it) and reads the org's overview once the portal has learnt the membership."""
    typer.echo(f"web portal for {org}:")
    await tally.accounts.InviteMember(apb.InviteMemberRequest(
        org_id=org, subject=DEMO_VIEWER, role=apb.ROLE_VIEWER,
        context=cpb.RequestContext(org_id=org, actor=f"user:{DEMO_OWNER}")))
    url = suite.portal_url(config)
    overview = f"/orgs/{org}/overview"
    async with httpx.AsyncClient(base_url=url, timeout=10.0) as http:
        form = await http.get("/sign-in", params={"next": overview})
        token = re.search(r'name="login_token" value="([^"]+)"', form.text)
        if form.status_code != 200 or token is None:
            raise TallyError(Reason.UNAVAILABLE, f"the portal at {url} offers no development "
                             f"sign-in ({form.status_code}); is it running (tally up)?")
        await http.post("/dev/sign-in", data={"login_token": token.group(1),
                                               "subject": DEMO_VIEWER, "next": overview})
        # the portal learns the new membership from accounts' credentials feed
        deadline = time.monotonic() + PORTAL_SIGN_IN_TIMEOUT_S
        while (page := await http.get(overview)).status_code != 200:
            if time.monotonic() > deadline:
                raise TallyError(Reason.UNAVAILABLE, f"the portal did not show {overview} to "
                                 f"{DEMO_VIEWER}: {page.status_code}")
            await asyncio.sleep(0.2)
    shown = re.search(r'id="available">([^<]+)<', page.text)
    _say("portal", f"{url}{overview}")
    _say("signed in as", f"{DEMO_VIEWER} (viewer): available "
         f"{shown.group(1) if shown else '?'} credits")
