"""Services prove who they are with client certificates: the kit serves mutual TLS from files
(re-read when they change) and the guard takes the identity from the verified certificate."""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import pytest

from tally.kit.tls import TlsFiles
from tally.pricing.v1 import pricing_pb2 as pb
from tally.pricing.v1 import pricing_pb2_grpc
from tests.pricing.conftest import build_for
from tests.support.certs import Authority

from .conftest import Identities


def client(ca: Authority, directory: Path, name: str, issuer: Authority
           ) -> grpc.ChannelCredentials:
    cert, key = issuer.issue(name, dns=(name,))
    del directory
    return grpc.ssl_channel_credentials(root_certificates=ca.pem(), private_key=key,
                                        certificate_chain=cert)


async def test_a_service_is_known_by_its_verified_certificate_and_strangers_are_refused(
        ids: Identities, db_url: str, tmp_path: Path) -> None:
    from tally.kit.server import start_server

    servers_ca, clients_ca, rogue_ca = Authority("servers"), Authority("clients"), \
        Authority("rogue")
    cert, key = servers_ca.write(tmp_path, "server", "pricing", dns=("localhost",),
                                 ips=("127.0.0.1",))
    (tmp_path / "clients-ca.crt").write_bytes(clients_ca.pem())
    files = TlsFiles(cert, key, tmp_path / "clients-ca.crt")
    guard = ids.guard()
    running = await start_server(await build_for(db_url), port=0, authenticator=guard,
                                 tls=files)
    target = f"127.0.0.1:{running.port}"
    try:
        credentials = client(servers_ca, tmp_path, "ops", clients_ca)
        async with grpc.aio.secure_channel(target, credentials) as channel:
            stub = pricing_pb2_grpc.PricingServiceStub(channel)
            book = await stub.GetPriceBook(pb.GetPriceBookRequest())
            assert book.book.version == 1
            with pytest.raises(grpc.aio.AioRpcError) as operator:  # allowed, then validated
                await stub.MarginReport(pb.MarginReportRequest())
            assert operator.value.code() is grpc.StatusCode.INVALID_ARGUMENT

        internal = client(servers_ca, tmp_path, "metering", clients_ca)
        async with grpc.aio.secure_channel(target, internal) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as not_operator:
                await pricing_pb2_grpc.PricingServiceStub(channel).MarginReport(
                    pb.MarginReportRequest())
            assert not_operator.value.code() is grpc.StatusCode.PERMISSION_DENIED
            assert "svc:metering" in (not_operator.value.details() or "")

        unknown = client(servers_ca, tmp_path, "intruder", clients_ca)
        async with grpc.aio.secure_channel(target, unknown) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as not_configured:
                await pricing_pb2_grpc.PricingServiceStub(channel).GetPriceBook(
                    pb.GetPriceBookRequest())
            assert not_configured.value.code() is grpc.StatusCode.UNAUTHENTICATED

        for credentials in (client(servers_ca, tmp_path, "ops", rogue_ca),
                            grpc.ssl_channel_credentials(root_certificates=servers_ca.pem())):
            async with grpc.aio.secure_channel(target, credentials) as channel:
                with pytest.raises(grpc.aio.AioRpcError) as handshake:
                    await pricing_pb2_grpc.PricingServiceStub(channel).GetPriceBook(
                        pb.GetPriceBookRequest(), timeout=5)
                assert handshake.value.code() is grpc.StatusCode.UNAVAILABLE

        async with grpc.aio.insecure_channel(target) as channel:  # no plaintext port
            with pytest.raises(grpc.aio.AioRpcError):
                await pricing_pb2_grpc.PricingServiceStub(channel).GetPriceBook(
                    pb.GetPriceBookRequest(), timeout=5)

        # The client CA rotates: new handshakes trust the new one, without a restart.
        (tmp_path / "clients-ca.crt").write_bytes(rogue_ca.pem())
        stat = os.stat(tmp_path / "clients-ca.crt")
        os.utime(tmp_path / "clients-ca.crt", ns=(stat.st_atime_ns,
                                                  stat.st_mtime_ns + 1_000_000_000))
        rotated = client(servers_ca, tmp_path, "ops", rogue_ca)
        async with grpc.aio.secure_channel(target, rotated) as channel:
            book = await pricing_pb2_grpc.PricingServiceStub(channel).GetPriceBook(
                pb.GetPriceBookRequest(), timeout=5)
            assert book.book.version == 1
    finally:
        await running.stop()
