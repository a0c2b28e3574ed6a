"""Requests the kit refuses before the ledger's handlers: undecodable bytes, NUL characters,
timestamps past the representable range, values too big to store: INVALID_ARGUMENT naming the
field where it can, never INTERNAL or UNKNOWN."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest

from tally.kit.errors import Reason, from_rpc_error
from tally.kit.server import RunningServer
from tally.ledger.v1 import ledger_pb2


@pytest.fixture
async def channel(ledger_server: RunningServer) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ledger_server.port}") as opened:
        yield opened


async def _refusal(channel: grpc.aio.Channel, method: str, payload: bytes
                   ) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await channel.unary_unary(f"/tally.ledger.v1.LedgerService/{method}")(payload)
    return refused.value


@pytest.mark.parametrize("payload", [b"\xff\xff\xff\xff", b"\x0a\x03\xed\xa0\x80", b"\x07"],
                         ids=["corrupt", "lone-surrogate", "bad-wire-type"])
async def test_undecodable_request_bytes_answer_invalid_argument(
        channel: grpc.aio.Channel, payload: bytes) -> None:
    refused = await _refusal(channel, "GetBalance", payload)
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(refused)
    assert error is not None and error.reason is Reason.INVALID_ARGUMENT


async def test_a_nul_character_is_refused_naming_the_field_path(
        channel: grpc.aio.Channel) -> None:
    request = ledger_pb2.TransferBatchRequest(transfers=[
        ledger_pb2.TransferRequest(transfer_id="t-1", org_id="org-1"),
        ledger_pb2.TransferRequest(transfer_id="t-\x002", org_id="org-1")])
    refused = await _refusal(channel, "TransferBatch", request.SerializeToString())
    assert refused.code() == grpc.StatusCode.INVALID_ARGUMENT
    error = from_rpc_error(refused)
    assert error is not None and error.field == "transfers[1].transfer_id"
    read = ledger_pb2.GetBalanceRequest(org_id="org\x00")
    refused = await _refusal(channel, "GetBalance", read.SerializeToString())
    error = from_rpc_error(refused)
    assert error is not None and error.field == "org_id"


async def test_a_very_long_id_is_invalid_argument_not_internal(channel: grpc.aio.Channel
                                                               ) -> None:
    request = ledger_pb2.GetTransferRequest(org_id="org-1", transfer_id="x" * 1_000_000)
    refused = await _refusal(channel, "GetTransfer", request.SerializeToString())
    assert refused.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
