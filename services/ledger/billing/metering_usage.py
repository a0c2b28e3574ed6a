"""Metering's usage of the ledger's batches, over gRPC (GetBatchUsage): the adapter behind
`statements.UsageItemizer`. Metering owns usage events; the ledger asks it for the events of
the batches it debited, so statements itemize exactly the debits they list and Reconcile
compares the two batch by batch."""

from __future__ import annotations

import grpc

from services.ledger.billing import statements as st
from tally.metering.v1 import metering_pb2, metering_pb2_grpc

CALL_TIMEOUT_S = 30.0
"""Deadline of one GetBatchUsage call (at most 1000 batches of one org)."""


class MeteringItemizer:
    """Asks metering; an unreachable metering is UsageUnavailable, not an error of the
    statement or reconciliation that asked."""

    def __init__(self, stub: metering_pb2_grpc.MeteringServiceAsyncStub) -> None:
        self.stub = stub

    async def batch_usage(self, org_id: str, batch_ids: list[str]) -> st.BatchUsage:
        try:
            answer = await self.stub.GetBatchUsage(
                metering_pb2.GetBatchUsageRequest(org_id=org_id, batch_ids=batch_ids),
                timeout=CALL_TIMEOUT_S)
        except grpc.aio.AioRpcError as exc:
            raise st.UsageUnavailable(f"metering: {exc.code().name} {exc.details()}") from None
        return st.BatchUsage(
            [st.BatchCharge(b.batch_id, b.credits_micros, b.event_count)
             for b in answer.batches],
            [st.UsageRow(r.dimension, r.value, r.credits_micros, r.event_count)
             for r in answer.breakdown])
