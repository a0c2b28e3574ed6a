"""Payment commands of the `tally` CLI: buying credit and what follows it.

`tally purchase`, `tally orders`, `tally order`, `tally pay` (the local test provider's
checkout form), `tally manual-payment record|approve`, `tally refund`, `tally top-up
show|set`.

Credits are parsed and printed as credits ("12.5", exact micro-credits); money as an amount of
the currency ("20.00" USD = 2000 minor units). Writes carry an idempotency id (random unless
given), so re-running a command with the same id is safe, and an actor for the audit trail
(--actor or TALLY_ACTOR, default user:cli): a manual payment needs a second operator to
approve it.
"""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from html.parser import HTMLParser
from typing import TYPE_CHECKING, Annotated, Any, Final, TypeVar

import aiohttp
import typer

from tally.cli import calls
from tally.kit.config import KitConfig
from tally.kit.money import MoneyError, format_credits, format_money, minor_digits, parse_credits
from tally.ledger.v1 import ledger_pb2 as pb

if TYPE_CHECKING:  # the async stub type exists only in the generated .pyi
    from tally.ledger.v1.ledger_pb2_grpc import LedgerServiceAsyncStub as Ledger

T = TypeVar("T")

MANUAL_METHODS: Final = {"bank-transfer": pb.MANUAL_PAYMENT_METHOD_BANK_TRANSFER,
                         "invoice": pb.MANUAL_PAYMENT_METHOD_INVOICE}
TEST_CARD: Final = "4242424242424242"
"""The local provider's test card that always succeeds."""
CHECKOUT_TIMEOUT_S: Final = 30.0
"""How long `tally pay` waits for the checkout page to answer."""
DEFAULT_MAX_TOP_UPS_PER_DAY: Final = 1

top_up_app = typer.Typer(help="Automatic top-up: buy credit when the balance runs low.",
                         no_args_is_help=True)
manual_app = typer.Typer(help="Payments received outside checkout (bank transfer, invoice): "
                              "one operator records, another approves.", no_args_is_help=True)


# --- parsing ------------------------------------------------------------------------------


def parse_money(text: str, currency: str, option: str = "--custom") -> int:
    """An amount of `currency` ("20", "20.00") as exact minor units (2000); a fraction of a
    minor unit, zero or a negative amount is a bad parameter."""
    try:
        value = Decimal(text.strip().replace("_", ""))
    except InvalidOperation:
        raise typer.BadParameter(f"{text!r} is not an amount of money",
                                 param_hint=option) from None
    minor = value.scaleb(minor_digits(currency)) if value.is_finite() else value
    if not minor.is_finite() or minor != minor.to_integral_value() or minor <= 0:
        raise typer.BadParameter(
            f"{text!r} is not a positive amount of {currency.upper()} in whole minor units",
            param_hint=option)
    return int(minor)


def parse_amount(text: str, option: str) -> int:
    """Credits ("12.5") as exact micro-credits; anything else is a bad parameter."""
    try:
        return parse_credits(text)
    except MoneyError as exc:
        raise typer.BadParameter(str(exc), param_hint=option) from exc


def _method(text: str) -> pb.ManualPaymentMethod.ValueType:
    try:
        return MANUAL_METHODS[text.lower()]
    except KeyError:
        raise typer.BadParameter(f"must be one of {', '.join(MANUAL_METHODS)}",
                                 param_hint="--method") from None


def what_to_buy(package: str | None, custom: str | None, currency: str
                ) -> dict[str, Any]:
    """The `amount` oneof of a Purchase or AutoTopUp: exactly one of --package and --custom."""
    if bool(package) == bool(custom):
        raise typer.BadParameter("give exactly one of --package ID and --custom AMOUNT",
                                 param_hint="--package/--custom")
    if package:
        return {"package_id": package}
    assert custom is not None
    return {"custom": pb.CustomAmount(amount_minor=parse_money(custom, currency),
                                      currency=currency.upper())}


def new_order_id() -> str:
    """A fresh payment order id (the idempotency key of a purchase or a manual payment)."""
    return f"po-cli-{uuid.uuid4().hex}"


# --- printing -----------------------------------------------------------------------------


def _name(proto_enum: Any, prefix: str, number: int) -> str:
    return str(proto_enum.Name(number)).removeprefix(prefix) if number else "-"


def _when(stamp: Any) -> str:
    if not stamp.ByteSize():
        return "-"
    return str(stamp.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds"))


def state_name(order: pb.PaymentOrder) -> str:
    """The order's state without its prefix: PENDING, SUCCEEDED, ..."""
    return _name(pb.PaymentOrderState, "PAYMENT_ORDER_STATE_", order.state)


def _credits(credits_micros: int, bonus_micros: int) -> str:
    bonus = f" + {format_credits(bonus_micros)} bonus" if bonus_micros else ""
    return f"{format_credits(credits_micros)}{bonus}"


def show_order(order: pb.PaymentOrder) -> None:
    """Prints a payment order."""
    kind = _name(pb.PaymentOrderKind, "PAYMENT_ORDER_KIND_", order.kind)
    typer.echo(f"order {order.payment_order_id}  org {order.org_id}  {state_name(order)}  "
               f"({kind}, {order.provider})")
    if order.package_id:
        typer.echo(f"  package    {order.package_id} (price book v{order.price_book_version})")
    typer.echo(f"  price      {format_money(order.amount_minor, order.currency)}")
    typer.echo(f"  credits    {_credits(order.credits_micros, order.bonus_credits_micros)}")
    if order.refunded_micros or order.refunded_minor:
        typer.echo(f"  refunded   {format_credits(order.refunded_micros)} credits, "
                   f"{format_money(order.refunded_minor, order.currency)}")
    if order.failure_reason:
        typer.echo(f"  failed     {order.failure_reason}")
    if order.manual_method:
        method = _name(pb.ManualPaymentMethod, "MANUAL_PAYMENT_METHOD_", order.manual_method)
        typer.echo(f"  paid by    {method.lower().replace('_', '-')}, reference "
                   f"{order.reference}")
    if order.checkout_url:
        typer.echo(f"  checkout   {order.checkout_url}")
    typer.echo(f"  created    {_when(order.created_at)} by {order.created_by}")
    if order.approved_by:
        typer.echo(f"  approved   by {order.approved_by}")
    if order.HasField("settled_at"):
        typer.echo(f"  settled    {_when(order.settled_at)}")
    typer.echo(f"  transfer   {order.credit_transfer_id or '-'}")


def show_auto_top_up(config: pb.AutoTopUp) -> None:
    """Prints an org's automatic top-up configuration."""
    if not config.HasField("updated_at"):
        typer.echo(f"automatic top-up of {config.org_id}: never set (off)")
        return
    typer.echo(f"automatic top-up of {config.org_id}: {'on' if config.enabled else 'off'}  "
               f"(updated {_when(config.updated_at)} by {config.updated_by})")
    typer.echo(f"  below      {format_credits(config.threshold_micros)} credits available")
    which = config.WhichOneof("amount")
    if which == "package_id":
        typer.echo(f"  buys       package {config.package_id}")
    elif which == "custom":
        money = format_money(config.custom.amount_minor, config.custom.currency)
        typer.echo(f"  buys       {money}")
    typer.echo(f"  at most    {config.max_per_day} per UTC day")
    typer.echo(f"  charging   {config.payment_method_id or '-'}")


# --- calls --------------------------------------------------------------------------------


async def _call(config: KitConfig, rpc: Callable[[Ledger], Awaitable[T]],
                actor: str = calls.DEFAULT_ACTOR) -> T:
    return await calls.call(config, "ledger", rpc, actor=actor)


_context = calls.context


async def purchase(config: KitConfig, org: str, *, package: str = "",
                   custom: pb.CustomAmount | None = None, order_id: str = "",
                   actor: str = calls.DEFAULT_ACTOR) -> pb.PaymentOrder:
    """Creates a payment order with a hosted checkout page and prints it; credit comes once
    the provider confirms payment by webhook."""
    request = pb.PurchaseRequest(payment_order_id=order_id or new_order_id(),
                                 context=_context(org), org_id=org)
    if custom is not None:
        request.custom.CopyFrom(custom)
    else:
        request.package_id = package
    reply = await _call(config, lambda ledger: ledger.Purchase(request), actor)
    order = reply.order
    typer.echo(f"order {order.payment_order_id}  {state_name(order)}")
    typer.echo(f"  price      {format_money(order.amount_minor, order.currency)}")
    typer.echo(f"  credits    {_credits(order.credits_micros, order.bonus_credits_micros)}")
    typer.echo(f"  checkout   {order.checkout_url or '-'}")
    return order


async def get_order(config: KitConfig, org: str, order_id: str) -> pb.PaymentOrder:
    """Prints one payment order."""
    reply = await _call(config, lambda ledger: ledger.GetPaymentOrder(
        pb.GetPaymentOrderRequest(org_id=org, payment_order_id=order_id)))
    show_order(reply.order)
    return reply.order


def _orders_page(request: pb.ListPaymentOrdersRequest
                 ) -> Callable[[Ledger], Awaitable[pb.ListPaymentOrdersResponse]]:
    return lambda ledger: ledger.ListPaymentOrders(request)


async def list_orders(config: KitConfig, org: str, *, states: Sequence[str] = ()
                      ) -> list[pb.PaymentOrder]:
    """Prints an org's payment orders, newest first, a line each (every page)."""
    wanted = [pb.PaymentOrderState.Value(f"PAYMENT_ORDER_STATE_{s.upper()}") for s in states]
    found: list[pb.PaymentOrder] = []
    token = ""
    while True:
        request = pb.ListPaymentOrdersRequest(org_id=org, states=wanted, page_token=token)
        reply = await _call(config, _orders_page(request))
        found.extend(reply.orders)
        token = reply.next_page_token
        if not token:
            break
    if not found:
        typer.echo(f"no payment orders for {org}")
    for order in found:
        kind = _name(pb.PaymentOrderKind, "PAYMENT_ORDER_KIND_", order.kind).lower()
        typer.echo(f"{_when(order.created_at)}  {order.payment_order_id:<28} "
                   f"{state_name(order):<18} {kind:<11} "
                   f"{format_money(order.amount_minor, order.currency):>12}  "
                   f"{_credits(order.credits_micros, order.bonus_credits_micros)}")
    return found


async def record_manual_payment(config: KitConfig, org: str, *, amount_minor: int,
                                currency: str, credits_micros: int, bonus_micros: int,
                                reference: str, method: pb.ManualPaymentMethod.ValueType,
                                order_id: str = "",
                                actor: str = calls.DEFAULT_ACTOR) -> pb.PaymentOrder:
    """Records money received outside checkout as a PENDING order (nothing is credited until
    another operator approves it) and prints it."""
    reply = await _call(config, lambda ledger: ledger.RecordManualPayment(
        pb.RecordManualPaymentRequest(
            payment_order_id=order_id or new_order_id(), context=_context(org), org_id=org,
            amount_minor=amount_minor, currency=currency.upper(), credits_micros=credits_micros,
            bonus_credits_micros=bonus_micros, reference=reference, method=method)), actor)
    show_order(reply.order)
    typer.echo(f"approve with: tally manual-payment approve {reply.order.payment_order_id} "
               "--actor <another operator>")
    return reply.order


async def approve_manual_payment(config: KitConfig, order_id: str,
                                 actor: str = calls.DEFAULT_ACTOR
                                 ) -> pb.ApproveManualPaymentResponse:
    """Approves a recorded manual payment (not by its recorder) and prints the credit."""
    reply = await _call(config, lambda ledger: ledger.ApproveManualPayment(
        pb.ApproveManualPaymentRequest(payment_order_id=order_id)), actor)
    show_order(reply.order)
    typer.echo(f"available now {format_credits(reply.balance_after.available_micros)} credits")
    return reply


async def refund(config: KitConfig, order_id: str, *, credits_micros: int, reason: str,
                 refund_id: str = "", actor: str = calls.DEFAULT_ACTOR) -> pb.RefundResponse:
    """Refunds unspent purchased credit of an order (0 = all of it) and prints what moved."""
    reply = await _call(config, lambda ledger: ledger.Refund(pb.RefundRequest(
        refund_id=refund_id or calls.request_id(""), payment_order_id=order_id,
        amount_micros=credits_micros, reason=reason)), actor)
    order = reply.order
    typer.echo(f"refund {reply.refund_id} of {order.payment_order_id}: reversed "
               f"{format_credits(reply.reversed_micros)} credits, refunded "
               f"{format_money(reply.provider_refund_minor, order.currency)}"
               + (f", forfeited {format_credits(reply.bonus_forfeited_micros)} bonus"
                  if reply.bonus_forfeited_micros else ""))
    typer.echo(f"  order now  {state_name(order)}, refunded "
               f"{format_credits(order.refunded_micros)} of "
               f"{format_credits(order.credits_micros)} credits")
    return reply


async def get_auto_top_up(config: KitConfig, org: str) -> pb.AutoTopUp:
    """Prints an org's automatic top-up."""
    reply = await _call(config, lambda ledger: ledger.GetAutoTopUp(
        pb.GetAutoTopUpRequest(org_id=org)))
    show_auto_top_up(reply.auto_top_up)
    return reply.auto_top_up


async def set_auto_top_up(config: KitConfig, top_up: pb.AutoTopUp, request_id: str = "",
                          actor: str = calls.DEFAULT_ACTOR) -> pb.AutoTopUp:
    """Replaces an org's automatic top-up and prints what is stored."""
    reply = await _call(config, lambda ledger: ledger.SetAutoTopUp(pb.SetAutoTopUpRequest(
        request_id=calls.request_id(request_id), context=_context(top_up.org_id),
        auto_top_up=top_up)), actor)
    show_auto_top_up(reply.auto_top_up)
    return reply.auto_top_up


# --- paying a local checkout page ---------------------------------------------------------


@dataclasses.dataclass(frozen=True, slots=True)
class CheckoutAnswer:
    """What the checkout page said to a submitted card form."""

    is_accepted: bool
    detail: str
    """Where the page sent the payer (accepted), or the message it showed (refused)."""


class _TextById(HTMLParser):
    """Collects the text inside the elements with the given ids."""

    def __init__(self, ids: tuple[str, ...]) -> None:
        super().__init__()
        self.ids = ids
        self.found: dict[str, str] = {}
        self._open: list[tuple[str, str | None]] = []  # (tag, id being collected)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        element_id = dict(attrs).get("id")
        self._open.append((tag, element_id if element_id in self.ids else None))

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            if self._open.pop()[0] == tag:
                break

    def handle_data(self, data: str) -> None:
        for _, element_id in self._open:
            if element_id is not None:
                self.found[element_id] = self.found.get(element_id, "") + data


def _page_message(page: str) -> str:
    parser = _TextById(("error", "expired", "not-found"))
    parser.feed(page)
    return " ".join(" ".join(text.split()) for text in parser.found.values() if text.strip())


def _expiry_in_three_years() -> str:
    return f"12/{(datetime.now(UTC).year + 3) % 100:02d}"


async def pay_checkout(checkout_url: str, *, card: str = TEST_CARD, expiry: str = "",
                       cvc: str = "123", name: str = "Tally Demo",
                       timeout_s: float = CHECKOUT_TIMEOUT_S) -> CheckoutAnswer:
    """Submits the card form of a LOCAL-provider checkout page, as a payer's browser would.

    Accepted means the provider took the payment; the ledger credits it only when the
    provider's signed webhook arrives (watch the order). Refused carries the page's message
    (a declined card, a bad field, an expired checkout). Real providers' pages are not forms
    a program may post, so this works only with Tally's local test provider.
    """
    if not checkout_url.startswith(("http://", "https://")):
        return CheckoutAnswer(False, f"{checkout_url!r} is not an http(s) checkout URL")
    form = {"card_number": card, "expiry": expiry or _expiry_in_three_years(), "cvc": cvc,
            "name": name}
    pay_url = checkout_url.rstrip("/") + "/pay"
    timeout = aiohttp.ClientTimeout(total=timeout_s)
    try:
        async with aiohttp.ClientSession(timeout=timeout) as http:
            async with http.post(pay_url, data=form, allow_redirects=False) as reply:
                status, location = reply.status, reply.headers.get("Location", "")
                page = await reply.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        return CheckoutAnswer(False, f"could not reach {pay_url}: {exc or type(exc).__name__}")
    if status in (302, 303) and location.rstrip("/").endswith("/authenticate"):
        return CheckoutAnswer(False, "the card needs authentication (3-D Secure): finish it in "
                                     f"a browser at {checkout_url.rstrip('/')}/authenticate")
    if status in (302, 303):
        return CheckoutAnswer(True, location)
    message = _page_message(page) if "html" in page[:200].lower() else ""
    return CheckoutAnswer(False, f"HTTP {status}: {message or page[:200].strip() or 'no body'}")


# --- commands -----------------------------------------------------------------------------

OrgArgument = Annotated[str, typer.Argument(help="Organization id.")]
OrderIdArgument = Annotated[str, typer.Argument(help="Payment order id.")]
Actor = Annotated[str, typer.Option(
    envvar="TALLY_ACTOR",
    help="Who you are, for the audit trail (user:<id>).")]
OrderId = Annotated[str, typer.Option(
    help="Payment order id, the idempotency key (default: new).")]
Package = Annotated[str | None, typer.Option(help="Credit package id, e.g. individual-20.")]
Custom = Annotated[str | None, typer.Option(
    help='Custom amount of money, e.g. "25.00" (with --currency).')]
Currency = Annotated[str, typer.Option(help="ISO 4217 currency of --custom.")]
RequestId = Annotated[str, typer.Option(help="Idempotency id (default: random).")]


def register(parent: typer.Typer, get_config: Callable[[], KitConfig]) -> None:
    """Adds the payment commands to the CLI (config is read lazily)."""
    import asyncio

    @parent.command("purchase")
    def purchase_command(org: OrgArgument, package: Package = None, custom: Custom = None,
                         currency: Currency = "USD", order_id: OrderId = "",
                         actor: Actor = calls.DEFAULT_ACTOR) -> None:
        """Buy credit: create a payment order and print its hosted checkout URL (credit is
        added when the provider confirms payment)."""
        amount = what_to_buy(package, custom, currency)
        asyncio.run(purchase(get_config(), org, package=amount.get("package_id", ""),
                             custom=amount.get("custom"), order_id=order_id, actor=actor))

    @parent.command("order")
    def order_command(org: OrgArgument, order_id: OrderIdArgument) -> None:
        """Print a payment order: state, amounts, refunds, failure reason, transfer."""
        asyncio.run(get_order(get_config(), org, order_id))

    @parent.command("orders")
    def orders_command(
        org: OrgArgument,
        state: Annotated[list[str] | None, typer.Option(
            help="Only this state (repeatable): pending, succeeded, failed, canceled, "
                 "refunded, partially-refunded.")] = None,
    ) -> None:
        """List an org's payment orders, newest first."""
        states = [s.replace("-", "_") for s in state or []]
        for s in states:
            if f"PAYMENT_ORDER_STATE_{s.upper()}" not in pb.PaymentOrderState.keys():
                raise typer.BadParameter(f"unknown state {s!r}", param_hint="--state")
        asyncio.run(list_orders(get_config(), org, states=states))

    @parent.command("pay")
    def pay_command(
        checkout_url: Annotated[str, typer.Argument(help="The order's checkout URL.")],
        card: Annotated[str, typer.Option(
            help="Test card: 4242424242424242 succeeds, 4000000000000002 is declined.")]
        = TEST_CARD,
        expiry: Annotated[str, typer.Option(help="MM/YY (default: three years ahead).")] = "",
        cvc: Annotated[str, typer.Option(help="3 or 4 digits.")] = "123",
        name: Annotated[str, typer.Option(help="Name on the card.")] = "Tally Demo",
    ) -> None:
        """Pay a checkout page with a test card, without a browser. Works only with the
        local test provider (the default, which moves no real money)."""
        answer = asyncio.run(pay_checkout(checkout_url, card=card, expiry=expiry, cvc=cvc,
                                          name=name))
        if not answer.is_accepted:
            typer.echo(f"payment refused: {answer.detail}", err=True)
            raise typer.Exit(1)
        typer.echo("payment accepted; the ledger credits it when the provider's webhook "
                   "arrives (see: tally order ORG ORDER_ID)")

    @manual_app.command("record")
    def manual_record(
        org: OrgArgument,
        amount_minor: Annotated[int, typer.Option(
            help="Money received, minor units (2000 = 20.00).")],
        credits: Annotated[str, typer.Option(help='Credits to grant on approval, e.g. "2000".')],
        reference: Annotated[str, typer.Option(help="Bank or invoice reference.")],
        method: Annotated[str, typer.Option(help="bank-transfer or invoice.")],
        currency: Annotated[str, typer.Option(help="ISO 4217 currency.")] = "USD",
        bonus: Annotated[str, typer.Option(help="Bonus credits on approval.")] = "0",
        order_id: OrderId = "",
        actor: Actor = calls.DEFAULT_ACTOR,
    ) -> None:
        """Record a payment received outside checkout; another operator must approve it."""
        asyncio.run(record_manual_payment(
            get_config(), org, amount_minor=amount_minor, currency=currency,
            credits_micros=parse_amount(credits, "--credits"),
            bonus_micros=parse_amount(bonus, "--bonus"), reference=reference,
            method=_method(method), order_id=order_id, actor=actor))

    @manual_app.command("approve")
    def manual_approve(order_id: OrderIdArgument, actor: Actor = calls.DEFAULT_ACTOR) -> None:
        """Approve a recorded manual payment and credit it (not by whoever recorded it)."""
        asyncio.run(approve_manual_payment(get_config(), order_id, actor))

    @parent.command("refund")
    def refund_command(
        order_id: OrderIdArgument,
        reason: Annotated[str, typer.Option(help="Why (required, kept in the ledger).")],
        credits: Annotated[str, typer.Option(
            help='Purchased credits to reverse, e.g. "500"; 0 = all still unspent.')] = "0",
        refund_id: Annotated[str, typer.Option(
            help="Idempotency id of the refund (default: new).")] = "",
        actor: Actor = calls.DEFAULT_ACTOR,
    ) -> None:
        """Refund unspent purchased credit of an order; the money goes back in proportion."""
        asyncio.run(refund(get_config(), order_id, credits_micros=parse_amount(
            credits, "--credits"), reason=reason, refund_id=refund_id, actor=actor))

    @top_up_app.command("show")
    def top_up_show(org: OrgArgument) -> None:
        """Print an org's automatic top-up."""
        asyncio.run(get_auto_top_up(get_config(), org))

    @top_up_app.command("set")
    def top_up_set(
        org: OrgArgument,
        threshold: Annotated[str | None, typer.Option(
            help='Top up when available credit drops below this, e.g. "100".')] = None,
        package: Package = None, custom: Custom = None, currency: Currency = "USD",
        payment_method: Annotated[str, typer.Option(
            help="Saved payment method to charge, e.g. pm_card_visa (local provider).")] = "",
        max_per_day: Annotated[int, typer.Option(
            help="At most this many top-ups per UTC day, 1..24.")] = DEFAULT_MAX_TOP_UPS_PER_DAY,
        disable: Annotated[bool, typer.Option(
            "--disable", help="Turn automatic top-up off.")] = False,
        request_id: RequestId = "",
        actor: Actor = calls.DEFAULT_ACTOR,
    ) -> None:
        """Replace an org's automatic top-up (the whole configuration)."""
        top_up = pb.AutoTopUp(org_id=org, enabled=not disable, max_per_day=max_per_day,
                              payment_method_id=payment_method)
        if threshold is not None:
            top_up.threshold_micros = parse_amount(threshold, "--threshold")
        if package or custom or not disable:
            amount = what_to_buy(package, custom, currency)
            if "custom" in amount:
                top_up.custom.CopyFrom(amount["custom"])
            else:
                top_up.package_id = amount["package_id"]
        if not disable and threshold is None:
            raise typer.BadParameter("required unless --disable", param_hint="--threshold")
        if not disable and not payment_method:
            raise typer.BadParameter("required unless --disable", param_hint="--payment-method")
        asyncio.run(set_auto_top_up(get_config(), top_up, request_id, actor))

    parent.add_typer(manual_app, name="manual-payment")
    parent.add_typer(top_up_app, name="top-up")
