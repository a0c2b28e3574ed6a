"""The payment commands of `tally` against real pricing and ledger servers (real PostgreSQL) and
the local provider's checkout pages: the CLI process prints what the ledger answers, pays a
checkout through its form, and a refusal prints its reason with a non-zero exit."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
import typer

from tally.cli import payments as payments_cli
from tally.kit.config import KitConfig, load_kit_config
from tally.kit.errors import Reason, TallyError
from tally.kit.money import format_money
from tally.ledger.v1 import ledger_pb2 as pb
from tests.ledger.payments_support import (
    CREDIT,
    PACKAGE,
    PACKAGE_BONUS,
    PACKAGE_CREDITS,
    Shop,
    eventually,
    open_shop,
)

CLI_TIMEOUT_S = 60
ORG = "acme"


@pytest.fixture
async def shop(db_url: str) -> AsyncIterator[Shop]:
    async with open_shop(db_url) as opened:
        yield opened


def config_of(shop: Shop) -> KitConfig:
    """The CLI's configuration, pointed at the shop's ledger."""
    return dataclasses.replace(load_kit_config({}), ledger_port=shop.ledger.port,
                               pricing_port=shop.pricing.port)


@dataclass(frozen=True)
class Ran:
    """A finished `tally` process."""

    exit_code: int
    out: str
    err: str


async def tally(shop: Shop, *args: str, actor: str = "") -> Ran:
    """Runs the real CLI in its own process against the shop's ledger."""
    env = dict(os.environ, TALLY_LEDGER_PORT=str(shop.ledger.port))
    env.pop("TALLY_LEDGER_ADDRESS", None)
    env.pop("TALLY_ACTOR", None)
    if actor:
        env["TALLY_ACTOR"] = actor
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tally.cli.main", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(CLI_TIMEOUT_S):
        out, err = await process.communicate()
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


def shown(printed: str, label: str) -> str:
    """The value printed after `label` on its own line ("  checkout   <url>")."""
    found = re.search(rf"^\s*{re.escape(label)}\s+(.*)$", printed, re.MULTILINE)
    assert found is not None, f"no {label!r} line in:\n{printed}"
    return found.group(1).strip()


def words(printed: str) -> str:
    """A usage error's text without the box drawn around it, one space between words."""
    return " ".join(w for w in printed.split() if w not in ("│", "╭", "╰"))


async def available(shop: Shop) -> int:
    """The org's available credit; 0 before it has an account."""
    try:
        return (await shop.balance(ORG)).available_micros
    except TallyError as exc:
        assert exc.reason is Reason.NOT_FOUND
        return 0


async def paid_order(shop: Shop, order_id: str) -> pb.PaymentOrder:
    """Buys the starter package with the test card and waits for the webhook's credit."""
    order = await shop.purchase(order_id, ORG)
    assert await shop.pay(order) == 303
    return await eventually(lambda: _succeeded(shop, order_id), f"{order_id} SUCCEEDED")


async def _succeeded(shop: Shop, order_id: str) -> pb.PaymentOrder | None:
    order = await shop.order(order_id, ORG)
    return order if order.state == pb.PAYMENT_ORDER_STATE_SUCCEEDED else None


# ---- purchase, pay, order --------------------------------------------------------------------


async def test_purchase_then_pay_then_order_shows_succeeded_and_the_balance_rises(
        shop: Shop) -> None:
    bought = await tally(shop, "purchase", ORG, "--package", PACKAGE, "--order-id", "po-cli-1")
    assert bought.exit_code == 0, bought.err
    assert "order po-cli-1  PENDING" in bought.out
    assert shown(bought.out, "price") == "USD 20.00"
    assert shown(bought.out, "credits") == "2000 + 100 bonus"
    checkout_url = shown(bought.out, "checkout")
    assert checkout_url.startswith(shop.provider.url + "/checkout/")

    paid = await tally(shop, "pay", checkout_url)
    assert paid.exit_code == 0, paid.err
    assert "payment accepted" in paid.out
    await shop.provider.settled()
    await eventually(lambda: _succeeded(shop, "po-cli-1"), "the webhook's credit")

    order = await tally(shop, "order", ORG, "po-cli-1")
    assert order.exit_code == 0, order.err
    assert order.out.startswith("order po-cli-1  org acme  SUCCEEDED  (CHECKOUT, local)")
    version = (await shop.order("po-cli-1", ORG)).price_book_version
    assert shown(order.out, "package") == f"{PACKAGE} (price book v{version})"
    assert shown(order.out, "transfer") == "purchase:po-cli-1"
    assert shown(order.out, "created").endswith("by user:cli")
    assert "checkout" not in order.out  # no page to pay any more

    balance = await tally(shop, "balance", ORG)
    assert balance.exit_code == 0, balance.err
    assert shown(balance.out, "available") == "2100"
    assert (await shop.balance(ORG)).available_micros == PACKAGE_CREDITS + PACKAGE_BONUS


async def test_a_custom_amount_buys_credit_at_the_price_books_custom_price(
        shop: Shop, capsys: pytest.CaptureFixture[str]) -> None:
    amount = payments_cli.what_to_buy(None, "25.50", "usd")
    order = await payments_cli.purchase(config_of(shop), ORG, custom=amount["custom"])
    assert (order.amount_minor, order.currency) == (2550, "USD")
    assert order.credits_micros == 2550 * CREDIT  # 1 US cent per credit
    assert order.payment_order_id.startswith("po-cli-")
    printed = capsys.readouterr().out
    assert shown(printed, "price") == "USD 25.50" and shown(printed, "credits") == "2550"
    for bad in ("25.005", "0", "-3", "lots"):
        with pytest.raises(typer.BadParameter):
            payments_cli.what_to_buy(None, bad, "USD")
    assert payments_cli.parse_money("500", "JPY") == 500
    assert format_money(1_234_567, "usd") == "USD 12,345.67"
    with pytest.raises(typer.BadParameter):
        payments_cli.what_to_buy(PACKAGE, "25", "USD")  # both
    with pytest.raises(typer.BadParameter):
        payments_cli.what_to_buy(None, None, "USD")  # neither


async def test_an_unknown_package_names_it_and_exits_non_zero(
        shop: Shop, capsys: pytest.CaptureFixture[str]) -> None:
    refused = await tally(shop, "purchase", ORG, "--package", "no-such-package")
    assert refused.exit_code == 1
    assert refused.err.startswith("NOT_FOUND: package_id: no package 'no-such-package'")
    assert refused.out == ""

    with pytest.raises(typer.Exit) as exited:
        await payments_cli.purchase(config_of(shop), ORG, package="enterprise-20000")
    assert exited.value.exit_code == 1
    assert "manual settlement only" in capsys.readouterr().err

    neither = await tally(shop, "purchase", ORG)
    assert neither.exit_code == 2
    assert "exactly one of --package ID and --custom AMOUNT" in words(neither.err)


async def test_pay_with_a_declined_card_prints_the_pages_error_and_credits_nothing(
        shop: Shop) -> None:
    order = await shop.purchase("po-cli-declined", ORG)
    declined = await tally(shop, "pay", order.checkout_url, "--card", "4000000000000002")
    await shop.provider.settled()

    assert declined.exit_code == 1
    assert declined.err.startswith("payment refused: HTTP 402: Your card was declined. "
                                   "(card_declined)")
    order = await shop.order("po-cli-declined", ORG)
    assert order.state != pb.PAYMENT_ORDER_STATE_SUCCEEDED
    assert order.failure_reason == "card_declined" and not order.credit_transfer_id
    assert await available(shop) == 0


async def test_pay_names_what_is_wrong_with_the_page_or_the_url(shop: Shop) -> None:
    order = await shop.purchase("po-cli-bad-form", ORG)
    url = order.checkout_url

    bad_cvc = await payments_cli.pay_checkout(url, cvc="1")
    assert not bad_cvc.is_accepted
    assert bad_cvc.detail == ("HTTP 422: Your card's security code (CVC) must be 3 or 4 "
                              "digits.")
    three_ds = await payments_cli.pay_checkout(url, card="4000002500003155")
    assert not three_ds.is_accepted and "needs authentication" in three_ds.detail
    unknown = await payments_cli.pay_checkout(f"{shop.provider.url}/checkout/cs_nope")
    assert unknown.detail == "HTTP 404: No such checkout session."
    assert "not an http(s) checkout URL" in (await payments_cli.pay_checkout("cs_1")).detail


# ---- manual settlement -------------------------------------------------------------------------


async def test_a_manual_payment_is_approved_only_by_another_operator(shop: Shop) -> None:
    recorded = await tally(
        shop, "manual-payment", "record", ORG, "--amount-minor", "2000000", "--currency", "usd",
        "--credits", "20000", "--bonus", "1000", "--reference", "WIRE-2026-001",
        "--method", "bank-transfer", "--order-id", "po-wire-1", "--actor", "user:alice")
    assert recorded.exit_code == 0, recorded.err
    assert recorded.out.startswith("order po-wire-1  org acme  PENDING  (MANUAL, manual)")
    assert shown(recorded.out, "price") == "USD 20,000.00"
    assert shown(recorded.out, "paid by") == "bank-transfer, reference WIRE-2026-001"
    assert shown(recorded.out, "created").endswith("by user:alice")

    same = await tally(shop, "manual-payment", "approve", "po-wire-1", actor="user:alice")
    assert same.exit_code == 1
    assert same.err.startswith("PERMISSION_DENIED: ") and "differ from the recorder" in same.err
    assert (await shop.order("po-wire-1", ORG)).state == pb.PAYMENT_ORDER_STATE_PENDING

    approved = await tally(shop, "manual-payment", "approve", "po-wire-1", actor="user:bob")
    assert approved.exit_code == 0, approved.err
    assert "SUCCEEDED" in approved.out.splitlines()[0]
    assert shown(approved.out, "approved") == "by user:bob"
    assert "available now 21000 credits" in approved.out
    assert (await shop.balance(ORG)).available_micros == 21_000 * CREDIT

    wrong_method = await tally(shop, "manual-payment", "record", ORG, "--amount-minor", "1",
                               "--credits", "1", "--reference", "R", "--method", "cheque")
    assert wrong_method.exit_code == 2 and "bank-transfer, invoice" in words(wrong_method.err)


# ---- refunds -------------------------------------------------------------------------------


async def test_refund_returns_unspent_credit_in_part_then_in_full(
        shop: Shop, capsys: pytest.CaptureFixture[str]) -> None:
    await paid_order(shop, "po-cli-refund")

    part = await tally(shop, "refund", "po-cli-refund", "--credits", "500",
                       "--reason", "customer asked", "--refund-id", "rf-cli-1")
    assert part.exit_code == 0, part.err
    assert part.out.startswith("refund rf-cli-1 of po-cli-refund: reversed 500 credits, "
                               "refunded USD 5.00, forfeited 25 bonus")
    assert shown(part.out, "order now") == "PARTIALLY_REFUNDED, refunded 500 of 2000 credits"

    rest = await payments_cli.refund(config_of(shop), "po-cli-refund", credits_micros=0,
                                     reason="closing the account")
    assert (rest.reversed_micros, rest.provider_refund_minor) == (1500 * CREDIT, 1500)
    assert rest.order.state == pb.PAYMENT_ORDER_STATE_REFUNDED
    assert "order now  REFUNDED, refunded 2000 of 2000 credits" in capsys.readouterr().out
    assert (await shop.balance(ORG)).available_micros == 0

    with pytest.raises(typer.BadParameter):
        payments_cli.parse_amount("0.0000001", "--credits")


async def test_refunding_an_unpaid_order_names_the_reason_and_exits_non_zero(
        shop: Shop) -> None:
    await shop.purchase("po-cli-unpaid", ORG)
    refused = await tally(shop, "refund", "po-cli-unpaid", "--reason", "never paid")
    assert refused.exit_code == 1
    assert refused.err.startswith("PAYMENT_NOT_COMPLETED: ")


# ---- automatic top-up ----------------------------------------------------------------------


async def test_top_up_set_then_show_prints_the_stored_configuration(
        shop: Shop, capsys: pytest.CaptureFixture[str]) -> None:
    never = await tally(shop, "top-up", "show", ORG)
    assert never.exit_code == 0, never.err
    assert never.out.strip() == "automatic top-up of acme: never set (off)"

    stored = await tally(shop, "top-up", "set", ORG, "--threshold", "100.5", "--package",
                         PACKAGE, "--payment-method", "pm_card_visa", "--max-per-day", "2",
                         actor="user:carol")
    assert stored.exit_code == 0, stored.err
    shown_again = await tally(shop, "top-up", "show", ORG)
    for printed in (stored.out, shown_again.out):
        assert printed.startswith("automatic top-up of acme: on  (updated ")
        assert printed.splitlines()[0].endswith(" by user:carol)")
        assert shown(printed, "below") == "100.5 credits available"
        assert shown(printed, "buys") == f"package {PACKAGE}"
        assert shown(printed, "at most") == "2 per UTC day"
        assert shown(printed, "charging") == "pm_card_visa"

    config = config_of(shop)
    custom = payments_cli.what_to_buy(None, "50", "USD")["custom"]
    await payments_cli.set_auto_top_up(config, pb.AutoTopUp(
        org_id=ORG, enabled=False, threshold_micros=10 * CREDIT, custom=custom,
        max_per_day=1, payment_method_id="pm_card_visa"))
    stored_off = (await payments_cli.get_auto_top_up(config, ORG))
    assert not stored_off.enabled and stored_off.custom.amount_minor == 5000
    printed = capsys.readouterr().out
    assert "automatic top-up of acme: off" in printed and "buys       USD 50.00" in printed


async def test_top_up_set_refuses_an_incomplete_or_out_of_range_configuration(
        shop: Shop) -> None:
    no_method = await tally(shop, "top-up", "set", ORG, "--threshold", "100",
                            "--package", PACKAGE)
    assert no_method.exit_code == 2 and "required unless --disable" in words(no_method.err)

    too_many = await tally(shop, "top-up", "set", ORG, "--threshold", "100", "--package",
                           PACKAGE, "--payment-method", "pm_card_visa", "--max-per-day", "99")
    assert too_many.exit_code == 1
    assert too_many.err.startswith("INVALID_ARGUMENT: ") and "max_per_day" in too_many.err
    assert not (await shop.tally.ledger.GetAutoTopUp(
        pb.GetAutoTopUpRequest(org_id=ORG))).auto_top_up.enabled


async def test_orders_lists_an_orgs_orders_newest_first(shop: Shop) -> None:
    for order_id in ("po-a", "po-b"):
        await shop.purchase(order_id, org=ORG)
    await shop.pay(await shop.order("po-b", ORG))
    listed = await tally(shop, "orders", ORG)
    assert listed.exit_code == 0, listed.err
    lines = [line for line in listed.out.splitlines() if "po-" in line]
    assert [line.split()[1:3] for line in lines] == [["po-b", "SUCCEEDED"], ["po-a", "PENDING"]]
    only = await tally(shop, "orders", ORG, "--state", "pending")
    assert [line.split()[1] for line in only.out.splitlines() if "po-" in line] == ["po-a"]
    bad = await tally(shop, "orders", ORG, "--state", "lost")
    assert bad.exit_code == 2 and "unknown state" in bad.err
