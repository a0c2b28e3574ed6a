"""The portal against the services as a deployment runs them: separate processes with
TALLY_AUTH_MODE=enforce and mutual TLS (tests/auth/test_enforcing_suite.py's Deployment). The
portal follows accounts' feed with its own certificate (portal=internal), and every page and
action is decided again by the services on the signed-in person's OIDC access token, which
the portal forwards: the services' audit chain records the person, verified by OIDC."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import asyncpg
import httpx
import pytest

from services.portal.config import PortalConfig
from services.portal.routes import SESSION_COOKIE
from services.portal.server import start_portal
from tally.accounts.v1 import accounts_pb2 as apb
from tally.accounts.v1 import accounts_pb2_grpc
from tally.kit import db
from tally.kit.config import load_kit_config
from tally.kit.infra import free_port
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.ledger.v1 import ledger_pb2_grpc
from tests.auth.test_enforcing_suite import ORDER, Deployment
from tests.portal.support import csrf_of, field_of
from tests.support.oidc_provider import AUDIENCE, OidcProvider

ORG = "enforced"
PEOPLE = {"owner": "olivia", "developer": "dev", "viewer": "vera"}


async def _sign_in(url: str, issuer: str, subject: str) -> httpx.AsyncClient:
    http = httpx.AsyncClient(base_url=url, follow_redirects=False, timeout=20.0)
    to_provider = await http.get("/sign-in?next=/")
    form = dict(httpx.URL(to_provider.headers["location"]).params)
    form["username"] = subject
    async with httpx.AsyncClient(timeout=20.0) as provider_http:
        approved = await provider_http.post(f"{issuer}/authorize", data=form)
    back = httpx.URL(approved.headers["location"])
    done = await http.get(f"/auth/callback?{back.query.decode()}")
    assert done.status_code == 303, done.text
    assert SESSION_COOKIE in http.cookies
    return http


async def test_the_portal_works_with_services_that_enforce_credentials(
        db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    oidc = await OidcProvider().start()
    deployment = Deployment(db_url, tmp_path)
    deployment.env.update(TALLY_OIDC_ISSUER=oidc.issuer, TALLY_OIDC_AUDIENCE=AUDIENCE)
    deployment.env["TALLY_AUTH_SERVICES"] += ";portal=internal;fin=finance"
    portal = None
    try:
        await deployment.start()
        async with deployment.channel("accounts", "ops") as channel:
            accounts = accounts_pb2_grpc.AccountsServiceStub(channel)
            await accounts.CreateOrg(apb.CreateOrgRequest(
                org_id=ORG, name="Enforced", region="local", seat_limit=5,
                owner_subject=PEOPLE["owner"]))
            for role, number in (("developer", apb.ROLE_DEVELOPER),
                                 ("viewer", apb.ROLE_VIEWER)):
                await accounts.InviteMember(apb.InviteMemberRequest(
                    org_id=ORG, subject=PEOPLE[role], role=number))
        async with deployment.channel("ledger", "fin") as channel:
            await ledger_pb2_grpc.LedgerServiceStub(channel).Transfer(lpb.TransferRequest(
                transfer_id="welcome", org_id=ORG, kind=lpb.TRANSFER_KIND_PROMOTIONAL_GRANT,
                amount_micros=42_000_000, reason="welcome credit"))

        # the portal: its own certificate (who it is to the services), no trust mode
        cert, key = deployment.ca.write(tmp_path, "portal", "portal", dns=("portal",))
        for name, path in (("TALLY_TLS_CERT", cert), ("TALLY_TLS_KEY", key),
                           ("TALLY_TLS_CA", tmp_path / "ca.crt")):
            monkeypatch.setenv(name, str(path))
        config = load_kit_config({"TALLY_HOST": "127.0.0.1", **{
            f"TALLY_{s.upper()}_PORT": str(p) for s, p in deployment.ports.items()}})
        port = free_port()
        oidc.register("tally", f"http://127.0.0.1:{port}/auth/callback")
        portal = await start_portal(config, PortalConfig(oidc_issuer=oidc.issuer,
                                                         oidc_client_id="tally"), port)
        cache = portal.server.config.app.state.portal.client.cache
        for _ in range(1000):
            if all(ORG in cache.roles_of(p) for p in PEOPLE.values()):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the portal never read the memberships over mTLS")
        base = f"/orgs/{ORG}"

        owner = await _sign_in(portal.url, oidc.issuer, PEOPLE["owner"])
        overview = await owner.get(f"{base}/overview")
        assert overview.status_code == 200, overview.text[-500:]
        assert 'id="available">42' in overview.text
        keys = await owner.get(f"{base}/keys")
        assert keys.status_code == 200, keys.text[-500:]
        made = await owner.post(f"{base}/keys", data={
            "csrf_token": csrf_of(keys.text), "name": "from the portal", "role": "gateway",
            "request_id": field_of(keys.text, "request_id")})
        assert made.status_code == 201 and 'id="new-secret">tly_' in made.text, made.text[-500:]
        for page in ("usage", "transactions", "budgets", "alerts", "members", "statements",
                     "invoices", "credit", "top-up"):
            reply = await owner.get(f"{base}/{page}")
            assert reply.status_code == 200, (page, reply.text[-500:])
        await owner.aclose()

        developer = await _sign_in(portal.url, oidc.issuer, PEOPLE["developer"])
        keys = await developer.get(f"{base}/keys")
        assert keys.status_code == 200, keys.text[-500:]
        mine = await developer.post(f"{base}/keys", data={
            "csrf_token": csrf_of(keys.text), "name": "developer's own", "role": "developer",
            "request_id": uuid.uuid4().hex})
        assert mine.status_code == 201, mine.text[-500:]
        await developer.aclose()

        viewer = await _sign_in(portal.url, oidc.issuer, PEOPLE["viewer"])
        assert (await viewer.get(f"{base}/overview")).status_code == 200
        assert (await viewer.get(f"{base}/invoices")).status_code == 403
        await viewer.aclose()

        # the services decided on the people themselves: accounts' audit chain has each key
        # creation by the person, verified by OIDC (not by the portal's certificate)
        conn = await asyncpg.connect(db.asyncpg_url(db_url))
        try:
            for _ in range(400):
                rows = await conn.fetch(
                    "SELECT principal, verified_by FROM accounts.audit_log "
                    "WHERE org_id = $1 AND rpc LIKE '%/CreateApiKey' AND outcome = 'OK'", ORG)
                found = {(r["principal"], r["verified_by"]) for r in rows}
                if len(found) >= 2:
                    break
                await asyncio.sleep(0.05)
            assert found == {(f"user:{PEOPLE['owner']}", "oidc"),
                             (f"user:{PEOPLE['developer']}", "oidc")}, found
        finally:
            await conn.close()
    finally:
        if portal is not None:
            await portal.stop()
        deployment.stop()
        await oidc.stop()
        assert set(ORDER) == set(deployment.ports)
