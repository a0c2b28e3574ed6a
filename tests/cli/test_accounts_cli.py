"""The identity commands of `tally` as a separate process against real accounts servers: an
org, members and seats, a key whose secret is printed once, and TALLY_API_KEY as the CLI's
own credential against a server that verifies it."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass

from tests.accounts.conftest import accounts_server
from tests.auth.conftest import Identities, identities

CLI_TIMEOUT_S = 60


@dataclass(frozen=True)
class Ran:
    exit_code: int
    out: str
    err: str


async def tally(port: int, *args: str, api_key: str = "") -> Ran:
    env = dict(os.environ, TALLY_ACCOUNTS_PORT=str(port))
    env.pop("TALLY_ACCOUNTS_ADDRESS", None)
    env.pop("TALLY_API_KEY", None)
    if api_key:
        env["TALLY_API_KEY"] = api_key
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tally.cli.main", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(CLI_TIMEOUT_S):
        out, err = await process.communicate()
    assert process.returncode is not None
    return Ran(process.returncode, out.decode(), err.decode())


async def test_orgs_members_seats_and_keys_from_the_command_line(db_url: str) -> None:
    async with identities(db_url) as ids:
        port = int(ids.address.rsplit(":", 1)[1])
        made = await tally(port, "orgs", "create", "gamma", "--name", "Gamma", "--region",
                           "us-east", "--owner", "ceo@gamma.test", "--seats", "2")
        assert made.exit_code == 0, made.err
        assert "region us-east" in made.out
        assert (await tally(port, "members", "invite", "dev@gamma.test", "--org", "gamma",
                            "--role", "developer")).exit_code == 0
        refused = await tally(port, "members", "invite", "dev2@gamma.test", "--org", "gamma",
                              "--role", "admin")
        assert refused.exit_code == 1 and "SEAT_LIMIT_REACHED" in refused.err
        seats = await tally(port, "seats", "--org", "gamma")
        assert "2 of 2 paid seats, 0 free" in seats.out
        key = await tally(port, "keys", "create", "--org", "gamma", "--role", "admin",
                          "--name", "ci")
        assert key.exit_code == 0, key.err
        secret = key.out.splitlines()[1]
        assert secret.startswith("tly_org_") and "not shown again" in key.err
        listed = await tally(port, "keys", "list", "--org", "gamma")
        assert secret not in listed.out and "active" in listed.out
        await verified_cli(ids, db_url, secret)


async def verified_cli(ids: Identities, db_url: str, secret: str) -> None:
    """A second accounts replica that verifies callers: the CLI's key is its credential."""
    guard = ids.guard()
    async with accounts_server(db_url, authenticator=guard) as (running, _):
        await ids.synced(guard)
        ok = await tally(running.port, "members", "list", "--org", "gamma", api_key=secret)
        assert ok.exit_code == 0, ok.err
        assert "ceo@gamma.test" in ok.out
        other = await tally(running.port, "members", "list", "--org", "acme", api_key=secret)
        assert other.exit_code == 1 and "PERMISSION_DENIED" in other.err
        anonymous = await tally(running.port, "keys", "list", "--org", "gamma")
        assert anonymous.exit_code == 1 and "UNAUTHENTICATED" in anonymous.err
        verify = await tally(running.port, "audit", "verify", "--org", "gamma", api_key=secret)
        assert verify.exit_code == 0, verify.err
