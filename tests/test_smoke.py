"""Smoke: all four services start in process against one database and answer the probes
Kubernetes and grpcurl rely on — health (overall and per service) and reflection."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.ledger.server import build as build_ledger
from services.metering.server import build as build_metering
from services.notifier.server import build as build_notifier
from services.pricing.server import build as build_pricing
from tally.kit.config import KitConfig, load_kit_config
from tally.kit.infra import free_port
from tally.kit.server import RunningServer, ServiceApp, start_server
from tally.ledger.v1 import ledger_pb2
from tally.metering.v1 import metering_pb2
from tally.notifier.v1 import notifier_pb2
from tally.pricing.v1 import pricing_pb2

BUILDS: dict[str, tuple[Callable[[KitConfig], Awaitable[ServiceApp]], str]] = {
    "pricing": (build_pricing, pricing_pb2.DESCRIPTOR.services_by_name["PricingService"].full_name),
    "metering": (
        build_metering, metering_pb2.DESCRIPTOR.services_by_name["MeteringService"].full_name
    ),
    "ledger": (build_ledger, ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name),
    "notifier": (
        build_notifier, notifier_pb2.DESCRIPTOR.services_by_name["NotifierService"].full_name
    ),
}
INFRASTRUCTURE = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}


@pytest.fixture
async def all_four(db_url: str) -> AsyncIterator[dict[str, RunningServer]]:
    """Every service, started on port 0 against the same migrated database."""
    # Fixed free ports, not port 0: metering dials pricing and the ledger at their addresses.
    config = dataclasses.replace(
        load_kit_config({}), database_url=db_url, migrate_on_start=False,
        **{f"{name}_port": free_port() for name in BUILDS})
    running: dict[str, RunningServer] = {}
    try:
        for name, (build, _) in BUILDS.items():
            running[name] = await start_server(await build(config),
                                               port=getattr(config, f"{name}_port"))
        yield running
    finally:
        for server in reversed(running.values()):
            await server.stop()


async def _listed_services(channel: grpc.aio.Channel) -> set[str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    call = stub.ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    async for response in call:
        return {s.name for s in response.list_services_response.service}
    raise AssertionError("reflection sent no answer")


async def test_all_four_services_report_serving_and_list_themselves_by_reflection(
    all_four: dict[str, RunningServer],
) -> None:
    assert set(all_four) == {"pricing", "metering", "ledger", "notifier"}
    for name, server in all_four.items():
        service_name = BUILDS[name][1]
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            health = health_pb2_grpc.HealthStub(channel)
            for probe in ("", service_name):
                status = await health.Check(health_pb2.HealthCheckRequest(service=probe))
                assert status.status == health_pb2.HealthCheckResponse.SERVING, (name, probe)
            listed = await _listed_services(channel)
            assert {service_name, *INFRASTRUCTURE} <= listed, (name, listed)
