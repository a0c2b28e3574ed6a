"""Ledger commands of the `tally` CLI: balance, transactions, grant, verify-ledger."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import typer
from google.protobuf.timestamp_pb2 import Timestamp

from tally.common.v1 import common_pb2
from tally.kit.config import KitConfig
from tally.kit.errors import TallyError
from tally.kit.money import MoneyError, format_credits, parse_credits
from tally.ledger.v1 import ledger_pb2 as pb
from tally.sdk.client import TallyClient

_GRANT_KINDS = {
    "promo": (pb.TRANSFER_KIND_PROMOTIONAL_GRANT, pb.GRANT_KIND_PROMOTIONAL),
    "bonus": (pb.TRANSFER_KIND_BONUS, pb.GRANT_KIND_BONUS),
}


def _fail(message: str) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(1)


def _client(config: KitConfig) -> TallyClient:
    return TallyClient({"ledger": config.address_of("ledger")}, actor="user:cli")


async def balance(config: KitConfig, org: str) -> None:
    """Prints posted / held / available / arrears and the grants in burn order."""
    async with _client(config) as tally:
        try:
            b = (await tally.ledger.GetBalance(pb.GetBalanceRequest(org_id=org))).balance
        except TallyError as exc:
            raise _fail(f"{exc.reason}: {exc.message}") from exc
    state = common_pb2.BillingState.Name(b.billing_state).removeprefix("BILLING_STATE_")
    typer.echo(f"org {b.org_id}  ({state})")
    typer.echo(f"  posted     {format_credits(b.posted_micros):>16}")
    typer.echo(f"  held       {format_credits(b.held_micros):>16}")
    typer.echo(f"  available  {format_credits(b.available_micros):>16}")
    typer.echo(f"  arrears    {format_credits(b.arrears_micros):>16}")
    typer.echo("  grants (burn order):")
    for g in b.grants:
        expires = g.expires_at.ToDatetime(tzinfo=UTC).date() if g.HasField("expires_at") else "-"
        kind = pb.GrantKind.Name(g.grant_kind).removeprefix("GRANT_KIND_")
        typer.echo(f"    {kind:<12} {format_credits(g.remaining_micros):>14} of "
                   f"{format_credits(g.original_micros):<12} expires {expires}  {g.grant_id}")


async def transactions(config: KitConfig, org: str, kinds: list[str], limit: int) -> None:
    """Prints transfers newest first."""
    try:
        kind_values = [pb.TransferKind.Value(f"TRANSFER_KIND_{k.upper()}") for k in kinds]
    except ValueError as exc:
        raise _fail(f"unknown kind in {kinds}") from exc
    async with _client(config) as tally:
        try:
            reply = await tally.ledger.ListTransactions(pb.ListTransactionsRequest(
                org_id=org, kinds=kind_values, page_size=min(limit, 1000)))
        except TallyError as exc:
            raise _fail(f"{exc.reason}: {exc.message}") from exc
    for t in reply.transfers:
        when = t.created_at.ToDatetime(tzinfo=UTC).isoformat(timespec="seconds")
        kind = pb.TransferKind.Name(t.kind).removeprefix("TRANSFER_KIND_")
        sign = "+" if t.credit_account_id == f"org:{org}" else "-"
        typer.echo(f"{when}  {kind:<18} {sign}{format_credits(t.amount_micros):>14}  "
                   f"{t.transfer_id}  {t.actor}  {t.reason}")


async def grant(config: KitConfig, org: str, amount: str, kind: str, expires: str | None,
                reason: str, transfer_id: str | None) -> None:
    """Grants promotional or bonus credit."""
    if kind not in _GRANT_KINDS:
        raise _fail(f"--kind must be one of {', '.join(_GRANT_KINDS)}")
    try:
        micros = parse_credits(amount)
    except MoneyError as exc:
        raise _fail(f"AMOUNT: {exc}") from exc
    transfer_kind, grant_kind = _GRANT_KINDS[kind]
    spec = pb.GrantSpec(grant_kind=grant_kind)
    if expires:
        try:
            when = datetime.strptime(expires, "%Y-%m-%d").replace(tzinfo=UTC)
        except ValueError as exc:
            raise _fail("--expires: expected YYYY-MM-DD") from exc
        stamp = Timestamp()
        stamp.FromDatetime(when)
        spec.expires_at.CopyFrom(stamp)
    async with _client(config) as tally:
        try:
            reply = await tally.ledger.Transfer(pb.TransferRequest(
                transfer_id=transfer_id or f"cli-grant-{uuid.uuid4()}", org_id=org,
                kind=transfer_kind, amount_micros=micros, reason=reason, grant=spec))
        except TallyError as exc:
            raise _fail(f"{exc.reason}: {exc.message}") from exc
    typer.echo(f"granted {format_credits(micros)} to {org} ({reply.transfer.transfer_id}); "
               f"available {format_credits(reply.balance_after.available_micros)}")


async def verify(config: KitConfig, org: str) -> bool:
    """Walks the hash chains; prints the first bad entry if any."""
    async with _client(config) as tally:
        report = await tally.ledger.VerifyLedger(pb.VerifyLedgerRequest(org_id=org))
    if report.ok:
        typer.echo(f"ledger ok: {report.entries_checked} entries verified")
        return True
    # entries_checked counts the entries that verified, the ones before the bad one
    typer.echo(f"ledger NOT ok: {report.entries_checked} entries verified before the first "
               f"bad one: {report.detail} "
               f"(first bad transfer: {report.first_bad_transfer_id or '-'})", err=True)
    return False
