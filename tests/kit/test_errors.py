"""The error table, walked row by row through a real in-process gRPC server."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from tally.kit import errors
from tally.kit.errors import Reason, TallyError
from tally.kit.server import RunningServer, ServiceApp, start_server

SERVICE = "tally.test.v1.ErrorService"


def _raise(request: bytes, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
    text = request.decode()
    if text == "CRASH":
        raise RuntimeError("secret internal detail")
    reason = Reason(text)
    raise TallyError(
        reason,
        f"amount_micros: refused for {reason}",
        field="amount_micros",
        metadata={"available_micros": "42"},
        retry_after=timedelta(milliseconds=1500) if reason is Reason.QUOTA_EXCEEDED else None,
    )


async def _raise_async(request: bytes, context: grpc.aio.ServicerContext) -> bytes:  # type: ignore[type-arg]
    return _raise(request, context)


def _register(server: grpc.aio.Server) -> None:
    handler = grpc.method_handlers_generic_handler(
        SERVICE, {"Raise": grpc.unary_unary_rpc_method_handler(_raise_async)}
    )
    server.add_generic_rpc_handlers((handler,))


@pytest.fixture
async def error_server() -> AsyncIterator[RunningServer]:
    running = await start_server(ServiceApp("errors", [SERVICE], _register), port=0)
    yield running
    await running.stop()


async def _call(port: int, body: str) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        call = channel.unary_unary(f"/{SERVICE}/Raise")
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call(body.encode())
    return caught.value


async def test_every_reason_maps_to_its_status_with_error_info(error_server: RunningServer) -> None:
    assert set(errors.STATUS_OF) == set(Reason), "every reason has exactly one row"
    for reason, code in errors.STATUS_OF.items():
        failure = await _call(error_server.port, reason.value)
        assert failure.code() == code, reason
        decoded = errors.from_rpc_error(failure)
        assert decoded is not None, reason
        assert decoded.reason is reason
        assert decoded.metadata == {"available_micros": "42"}
        assert decoded.field == "amount_micros"


async def test_the_status_details_are_standard_google_rpc_types(
    error_server: RunningServer,
) -> None:
    failure = await _call(error_server.port, Reason.QUOTA_EXCEEDED.value)
    raw = dict(failure.trailing_metadata() or ())[errors.STATUS_DETAILS_KEY]
    status = status_pb2.Status.FromString(raw)
    assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    kinds = {d.TypeName() for d in status.details}
    assert kinds == {
        "google.rpc.ErrorInfo",
        "google.rpc.BadRequest",
        "google.rpc.RetryInfo",
    }
    for detail in status.details:
        if detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            retry = error_details_pb2.RetryInfo()
            detail.Unpack(retry)
            assert retry.retry_delay.ToTimedelta() == timedelta(milliseconds=1500)
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            assert (info.reason, info.domain) == ("QUOTA_EXCEEDED", "tally.dev")


async def test_an_unexpected_exception_is_internal_and_leaks_nothing(
    error_server: RunningServer,
) -> None:
    failure = await _call(error_server.port, "CRASH")
    assert failure.code() == grpc.StatusCode.INTERNAL
    assert "secret" not in (failure.details() or "")
    decoded = errors.from_rpc_error(failure)
    assert decoded is not None and decoded.reason is Reason.INTERNAL


def test_the_kit_reasons_are_exactly_the_contract_reasons() -> None:
    from tally.common.v1 import common_pb2

    contract = {
        name.removeprefix("ERROR_REASON_")
        for name in common_pb2.ErrorReason.keys()
        if name != "ERROR_REASON_UNSPECIFIED"
    }
    assert {r.value for r in Reason} == contract
