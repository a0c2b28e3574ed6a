"""LeaseStore: metering's side of the credit leases, in Postgres (metering.credit_leases).

One row per org, shared by every replica. The ledger's figures are applied by epoch: a
higher epoch is a new lease (what was charged against the old one stays the old one's), the
same epoch only lets granted and returned grow (the ledger's counters only grow, so answers
arriving out of order cannot undo each other). `held` is what open authorizations hold; it
carries over to a new lease, which is sized to cover it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import asyncpg

from .lease import LeaseFigures

_COLUMNS = ("org_id, lease_id, epoch, granted_micros, returned_micros, charged_micros, "
            "held_micros, billing_state, expires_at, ledger_available_micros")


def _figures(r: Any) -> LeaseFigures:
    return LeaseFigures(r["org_id"], r["lease_id"], r["epoch"], r["granted_micros"],
                        r["returned_micros"], r["charged_micros"], r["held_micros"],
                        r["billing_state"], r["expires_at"], r["ledger_available_micros"])


class LeaseStore:
    """Postgres persistence of metering's leases."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool

    async def lease_of(self, org_id: str) -> LeaseFigures | None:
        """The org's lease as metering knows it, if it has one."""
        row = await self.pool.fetchrow(
            f"SELECT {_COLUMNS} FROM metering.credit_leases WHERE org_id = $1", org_id)
        return _figures(row) if row else None

    async def leases(self) -> list[LeaseFigures]:
        """Every org's lease (a restart reloads them to keep renewing)."""
        return [_figures(r) for r in await self.pool.fetch(
            f"SELECT {_COLUMNS} FROM metering.credit_leases ORDER BY org_id")]

    async def apply(self, org_id: str, lease_id: str, epoch: int, granted: int, returned: int,
                    billing_state: str, expires_at: datetime, available: int = 0
                    ) -> LeaseFigures:
        """Takes the ledger's answer about lease `lease_id` (epoch `epoch`) of the org, and
        the org's available credit beyond it (`available`); returns the lease as it is now
        (a stale answer changes nothing)."""
        row = await self.pool.fetchrow(
            "INSERT INTO metering.credit_leases AS l (org_id, lease_id, epoch, granted_micros, "
            "returned_micros, billing_state, expires_at, ledger_available_micros) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8) "
            "ON CONFLICT (org_id) DO UPDATE SET lease_id = EXCLUDED.lease_id, "
            "epoch = EXCLUDED.epoch, "
            "granted_micros = CASE WHEN EXCLUDED.epoch > l.epoch THEN EXCLUDED.granted_micros "
            "ELSE greatest(l.granted_micros, EXCLUDED.granted_micros) END, "
            "returned_micros = CASE WHEN EXCLUDED.epoch > l.epoch THEN EXCLUDED.returned_micros "
            "ELSE greatest(l.returned_micros, EXCLUDED.returned_micros) END, "
            "charged_micros = CASE WHEN EXCLUDED.epoch > l.epoch THEN 0 "
            "ELSE l.charged_micros END, "
            "billing_state = EXCLUDED.billing_state, "
            "ledger_available_micros = EXCLUDED.ledger_available_micros, "
            "expires_at = CASE WHEN EXCLUDED.epoch > l.epoch THEN EXCLUDED.expires_at "
            "ELSE greatest(l.expires_at, EXCLUDED.expires_at) END, updated_at = now() "
            "WHERE EXCLUDED.epoch >= l.epoch", org_id, lease_id, epoch, granted, returned,
            billing_state, expires_at, available)
        if row is None:  # a newer lease is in place
            found = await self.lease_of(org_id)
            assert found is not None
            return found
        return await self.lease_of(org_id) or _figures(row)

    async def set_aside(self, org_id: str, lease_id: str, amount: int) -> bool:
        """Counts `amount` of lease `lease_id`'s free credit as returned, if it is still
        free (before the ledger is asked to take it back)."""
        return bool(await self.pool.fetchval(
            "UPDATE metering.credit_leases SET returned_micros = returned_micros + $3, "
            "updated_at = now() WHERE org_id = $1 AND lease_id = $2 AND granted_micros "
            "- returned_micros - charged_micros - held_micros >= $3 RETURNING true",
            org_id, lease_id, amount))

    async def changed_by_ledger(self, lease_id: str, granted: int, returned: int, ended: bool,
                                now: datetime) -> None:
        """The ledger shrank, revoked or ended lease `lease_id` (its outbox said so). It only
        shrinks a live lease once the org's available credit is used up: nothing beyond the
        lease is left to count in the balance headroom."""
        await self.pool.execute(
            "UPDATE metering.credit_leases SET granted_micros = greatest(granted_micros, $2), "
            "ledger_available_micros = CASE WHEN $4 THEN ledger_available_micros ELSE 0 END, "
            "returned_micros = greatest(returned_micros, $3), "
            "expires_at = CASE WHEN $4 THEN least(expires_at, $5) ELSE expires_at END, "
            "updated_at = now() WHERE lease_id = $1", lease_id, granted, returned, ended, now)

    async def billing_state_changed(self, org_id: str, state: str) -> None:
        """The org's billing state changed in the ledger (its outbox said so)."""
        await self.pool.execute(
            "UPDATE metering.credit_leases SET billing_state = $2, updated_at = now() "
            "WHERE org_id = $1", org_id, state)

    async def cursor(self) -> int:
        """Where the ledger's outbox was followed to."""
        return int(await self.pool.fetchval(
            "SELECT sequence FROM metering.ledger_cursor") or 0)

    async def advance(self, sequence: int) -> None:
        """Remembers where the ledger's outbox was followed to."""
        await self.pool.execute(
            "INSERT INTO metering.ledger_cursor (sequence) VALUES ($1) ON CONFLICT (id) "
            "DO UPDATE SET sequence = greatest(metering.ledger_cursor.sequence, $1)", sequence)


async def move_leases(conn: Any, charged: Mapping[str, int], freed: Mapping[str, int]
                      ) -> dict[str, str]:
    """Inside the ingestion (or sweeper) transaction, after the budgets' rows: the cost of
    usage recorded against each org's lease is charged to it and the holds of the
    authorizations it captured (or that lapsed) are freed. Returns the lease id per org that
    has one: the ledger items of the org name it, so the ledger pays them from the lease."""
    orgs: Sequence[str] = sorted(set(charged) | set(freed))
    if not orgs:
        return {}
    # locked in org order first (an UPDATE ... FROM takes its rows in no given order)
    await conn.execute("SELECT 1 FROM metering.credit_leases WHERE org_id = ANY($1::text[]) "
                       "ORDER BY org_id FOR UPDATE", list(orgs))
    rows = await conn.fetch(
        "UPDATE metering.credit_leases l SET charged_micros = l.charged_micros + k.charged, "
        "held_micros = l.held_micros - k.freed FROM unnest($1::text[], $2::bigint[], "
        "$3::bigint[]) AS k(org_id, charged, freed) "
        "WHERE l.org_id = k.org_id RETURNING l.org_id, l.lease_id",
        list(orgs), [charged.get(o, 0) for o in orgs], [freed.get(o, 0) for o in orgs])
    return {r["org_id"]: r["lease_id"] for r in rows}
