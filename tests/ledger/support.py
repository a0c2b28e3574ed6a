"""Helpers shared by the ledger's load and model tests."""

from __future__ import annotations

from google.protobuf.message import Message

from services.ledger import domain as d
from services.ledger.store import LedgerStore

FUNDER = d.Caller(actor="user:test-funder")


async def fund(store: LedgerStore, org: str, amount: int) -> None:
    """Grants `org` promotional credit (once per org and amount)."""
    await store.transfer(d.TransferCommand(f"fund:{org}:{amount}", org,
                                           d.TransferKind.PROMOTIONAL_GRANT, amount), FUNDER)


def differing_fields(a: Message, b: Message, prefix: str = "") -> list[str]:
    """Paths of the fields in which two messages of one type differ, e.g. "balance_after.as_of"."""
    found: list[str] = []
    for descriptor in a.DESCRIPTOR.fields:
        name = descriptor.name
        left, right = getattr(a, name), getattr(b, name)
        if left == right:
            continue
        is_message = descriptor.type == descriptor.TYPE_MESSAGE
        if is_message and not descriptor.is_repeated and a.HasField(name) and b.HasField(name):
            found += differing_fields(left, right, f"{prefix}{name}.")
        else:
            found.append(f"{prefix}{name}")
    return found
