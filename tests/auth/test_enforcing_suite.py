"""The five services as a deployment runs them: separate processes, TALLY_AUTH_MODE=enforce,
mutual TLS between them with certificates of one CA (each service known by its certificate),
and a caller holding API keys. A credit purchase paid at checkout, an authorization, usage and
the balance after it go through — every hop between services verified — and the trail of the
mutations is in accounts' audit chain, intact: Authorize's record (written in its hold's
transaction) like the others, and Envoy's rate-limit checks as one record counting them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import asyncpg
import grpc
from envoy.extensions.common.ratelimit.v3 import ratelimit_pb2
from envoy.service.ratelimit.v3 import rls_pb2, rls_pb2_grpc

from tally.accounts.v1 import accounts_pb2 as apb
from tally.accounts.v1 import accounts_pb2_grpc
from tally.cli.suite import health_state
from tally.kit import db
from tally.kit.infra import free_port
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.ledger.v1 import ledger_pb2_grpc
from tally.metering.v1 import metering_pb2 as mpb
from tally.metering.v1 import metering_pb2_grpc
from tests.metering.test_authorize import ask
from tests.metering.test_ingestion import ACCEPTED, usage
from tests.support.certs import Authority

REPO = Path(__file__).resolve().parents[2]
ORDER = ("accounts", "pricing", "ledger", "metering", "notifier")
"""Start order: the credentials source first, pricing before the services that read it."""
CREDIT = 1_000_000


class Deployment:
    """The five services as processes, each with its own certificate."""

    def __init__(self, db_url: str, directory: Path) -> None:
        self.ca = Authority("tally-e2e")
        self.dir = directory
        (directory / "ca.crt").write_bytes(self.ca.pem())
        self.ports = {service: free_port() for service in ORDER}
        self.health_ports = {service: free_port() for service in ORDER}
        self.env = dict(
            os.environ, TALLY_DATABASE_URL=db_url, TALLY_MIGRATE_ON_START="false",
            TALLY_AUTH_MODE="enforce", TALLY_HOST="127.0.0.1", TALLY_METRICS_PORT="0",
            TALLY_AUTH_SERVICES=";".join(f"{s}=internal" for s in ORDER) + ";ops=operator",
            TALLY_TLS_CA=str(directory / "ca.crt"),
            TALLY_TLS_CLIENT_CA=str(directory / "ca.crt"),
            TALLY_LEDGER_WEBHOOK_PORT=str(free_port()),
            TALLY_LEDGER_CHECKOUT_PORT=str(free_port()),
            TALLY_LEDGER_LOCAL_DUPLICATE_RATE="0", TALLY_LEDGER_LOCAL_REORDER_RATE="0",
            TALLY_AUDIT_FLUSH_MS="20",
            **{f"TALLY_{s.upper()}_PORT": str(port) for s, port in self.ports.items()})
        self.processes: dict[str, subprocess.Popen[bytes]] = {}

    def credentials(self, name: str) -> grpc.ChannelCredentials:
        """A client certificate for `name` (its identity if a service; else only TLS)."""
        cert, key = self.ca.issue(name, dns=(name,))
        return grpc.ssl_channel_credentials(root_certificates=self.ca.pem(), private_key=key,
                                            certificate_chain=cert)

    def channel(self, service: str, as_name: str) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(f"127.0.0.1:{self.ports[service]}",
                                       self.credentials(as_name))

    async def start(self) -> None:
        for service in ORDER:
            cert, key = self.ca.write(self.dir, service, service, dns=(service, "localhost"),
                                      ips=("127.0.0.1",))
            log = (self.dir / f"{service}.log").open("wb")
            self.processes[service] = subprocess.Popen(  # noqa: ASYNC220 - once per service
                [sys.executable, "-m", f"services.{service}"], cwd=REPO, stdout=log,
                stderr=subprocess.STDOUT,
                env={**self.env, "TALLY_TLS_CERT": str(cert), "TALLY_TLS_KEY": str(key),
                     "TALLY_HEALTH_PORT": str(self.health_ports[service])})
            await self.serving(service)

    async def serving(self, service: str) -> None:
        """As the kubelet probes it: plaintext gRPC health on the health-only port."""
        for _ in range(600):
            process = self.processes[service]
            assert process.poll() is None, (
                f"{service} exited: {(self.dir / f'{service}.log').read_text()[-3000:]}")
            if await health_state(f"127.0.0.1:{self.health_ports[service]}", 0.5) == "SERVING":
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{service} never SERVING")

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def bearer(secret: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {secret}"),)


async def test_purchase_authorize_usage_balance_with_mtls_and_api_keys(db_url: str,
                                                                     tmp_path: Path) -> None:
    deployment = Deployment(db_url, tmp_path)
    try:
        await deployment.start()
        # the health-only port answers health and nothing else; the service port is mTLS only
        async with grpc.aio.insecure_channel(
                f"127.0.0.1:{deployment.health_ports['ledger']}") as plain:
            try:
                await ledger_pb2_grpc.LedgerServiceStub(plain).GetBalance(
                    lpb.GetBalanceRequest(org_id="acme"))
                raise AssertionError("the health port answered a ledger call")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.UNIMPLEMENTED
        assert await health_state(f"127.0.0.1:{deployment.ports['ledger']}", 0.5) == "DOWN"
        # the operator (a verified certificate) opens the org and gives the app its keys
        async with deployment.channel("accounts", "ops") as channel:
            accounts = accounts_pb2_grpc.AccountsServiceStub(channel)
            await accounts.CreateOrg(apb.CreateOrgRequest(
                org_id="acme", name="Acme", region="local", seat_limit=5,
                owner_subject="owner@acme.test"))
            billing = await accounts.CreateApiKey(apb.CreateApiKeyRequest(
                request_id="k-billing", org_id="acme", role=apb.ROLE_BILLING, name="billing"))
            gateway = await accounts.CreateApiKey(apb.CreateApiKeyRequest(
                request_id="k-gateway", org_id="acme", role=apb.ROLE_GATEWAY, name="gateway"))

        async with deployment.channel("ledger", "app") as lch, \
                deployment.channel("metering", "app") as mch:
            ledger = ledger_pb2_grpc.LedgerServiceStub(lch)
            metering = metering_pb2_grpc.MeteringServiceStub(mch)
            # a key reaches every replica through accounts' feed: retry until it is known
            for _ in range(200):
                try:
                    order = (await ledger.Purchase(lpb.PurchaseRequest(
                        payment_order_id="order-1", org_id="acme", package_id="individual-20"),
                        metadata=bearer(billing.secret))).order
                    break
                except grpc.aio.AioRpcError as exc:
                    assert exc.code() is grpc.StatusCode.UNAUTHENTICATED, exc
                    await asyncio.sleep(0.05)
            async with aiohttp.ClientSession() as http, http.post(
                    f"{order.checkout_url}/pay", allow_redirects=False,
                    data={"card_number": "4242424242424242", "expiry": "12/39", "cvc": "123",
                          "name": "Ada"}) as paid:
                assert paid.status in (302, 303), await paid.text()
            for _ in range(400):
                order = (await ledger.GetPaymentOrder(lpb.GetPaymentOrderRequest(
                    org_id="acme", payment_order_id="order-1"),
                    metadata=bearer(billing.secret))).order
                if order.state == lpb.PAYMENT_ORDER_STATE_SUCCEEDED:
                    break
                await asyncio.sleep(0.05)
            assert order.state == lpb.PAYMENT_ORDER_STATE_SUCCEEDED, order

            # the gateway's key: a decision (metering -> ledger over mTLS), usage, the balance
            decision = await metering.Authorize(ask("req-1"), metadata=bearer(gateway.secret))
            assert decision.decision == mpb.DECISION_ALLOW, decision
            # the proxy's rate-limit checks: counted, one record per interval
            rls = rls_pb2_grpc.RateLimitServiceStub(mch)
            check = rls_pb2.RateLimitRequest(domain="tally", descriptors=[
                ratelimit_pb2.RateLimitDescriptor(entries=[
                    ratelimit_pb2.RateLimitDescriptor.Entry(key="org_id", value="acme")])])
            checks = await asyncio.gather(*(rls.ShouldRateLimit(
                check, metadata=bearer(gateway.secret)) for _ in range(3)))
            assert {c.overall_code for c in checks} == {rls_pb2.RateLimitResponse.OK}
            recorded = await metering.RecordUsage(mpb.RecordUsageRequest(
                events=[usage("event-1")]), metadata=bearer(gateway.secret))
            assert [r.status for r in recorded.results] == [ACCEPTED]
            cost = recorded.results[0].receipt.cost_micros
            balance = (await ledger.GetBalance(lpb.GetBalanceRequest(org_id="acme"),
                                               metadata=bearer(gateway.secret))).balance
            assert balance.posted_micros == order.credits_micros + order.bonus_credits_micros - cost

            # the same key may not move credit, and a caller with no credentials gets nothing
            try:
                await ledger.Transfer(lpb.TransferRequest(
                    transfer_id="t-1", org_id="acme", amount_micros=CREDIT,
                    kind=lpb.TRANSFER_KIND_PROMOTIONAL_GRANT), metadata=bearer(gateway.secret))
                raise AssertionError("a gateway key granted credit")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.PERMISSION_DENIED
            try:
                await ledger.GetBalance(lpb.GetBalanceRequest(org_id="acme"))
                raise AssertionError("a call without credentials was answered")
            except grpc.aio.AioRpcError as exc:
                assert exc.code() is grpc.StatusCode.UNAUTHENTICATED

        # the mutations are in the org's chain, each with who did it and how it was verified
        conn = await asyncpg.connect(db.asyncpg_url(db_url))
        try:
            for _ in range(400):
                rows = await conn.fetch("SELECT rpc, principal, verified_by, outcome, "
                                        "target_ids FROM accounts.audit_log "
                                        "WHERE org_id = 'acme'")
                seen = {(r["rpc"].rsplit("/", 1)[1], r["verified_by"], r["outcome"])
                        for r in rows}
                rate_checks = sum(int(t.removeprefix("calls=")) for r in rows
                                  if r["rpc"].endswith("/ShouldRateLimit")
                                  for t in r["target_ids"] if t.startswith("calls="))
                if {("Purchase", "api_key", "OK"), ("Authorize", "api_key", "OK"),
                        ("RecordUsage", "api_key", "OK"), ("ExtendLease", "mtls", "OK"),
                        ("ShouldRateLimit", "api_key", "OK"),
                        ("Transfer", "api_key", "PERMISSION_DENIED")} <= seen \
                        and rate_checks == 3:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"audit trail incomplete: {sorted(seen)}")
            assert {r["principal"] for r in rows if r["verified_by"] == "mtls"} <= {
                f"svc:{s}" for s in ORDER} | {"svc:ops"}
            # the decision's record names the request it decided
            assert any("request_id=req-1" in r["target_ids"] for r in rows
                       if r["rpc"].endswith("/Authorize")), rows
        finally:
            await conn.close()
        async with deployment.channel("accounts", "ops") as channel:
            verified = await accounts_pb2_grpc.AccountsServiceStub(channel).VerifyAudit(
                apb.VerifyAuditRequest(org_id="acme"))
            assert verified.is_intact, verified
    finally:
        deployment.stop()
