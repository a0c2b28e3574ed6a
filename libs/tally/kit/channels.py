"""Channels from one service to another, one way for every service.

Each outgoing call carries the caller's trace (OpenTelemetry client interceptors: a client
span, and W3C traceparent headers the peer's server span continues), and a channel whose
peer went away reconnects within a second once it is back (gRPC's default backoff grows to
two minutes).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

OPTIONS: Final = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.max_send_message_length", 32 * 1024 * 1024),
]


def peer_channel(address: str, metadata: Mapping[str, str] | None = None
                 ) -> grpc.aio.Channel:
    """A traced channel to the service at `address` (host:port); mutual TLS with this
    process's certificate when TALLY_TLS_CERT / _KEY / _CA are set (tally.kit.tls). Every
    call carries `metadata` (e.g. the region a per-region copy of a service speaks for)."""
    from tally.kit import tls

    interceptors: list[Any] = list(aio_client_interceptors())  # type: ignore[no-untyped-call]
    if metadata:
        interceptors.extend(_headers(tuple(metadata.items())))
    files = tls.client_files()
    if files is not None:
        return grpc.aio.secure_channel(address, tls.channel_credentials(files), options=OPTIONS,
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=OPTIONS, interceptors=interceptors)


def _headers(pairs: tuple[tuple[str, str], ...]) -> list[Any]:
    """Client interceptors, one per call shape, adding `pairs` to every call's metadata."""
    def details(call: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        return grpc.aio.ClientCallDetails(
            call.method, call.timeout, grpc.aio.Metadata(*(call.metadata or ()), *pairs),
            call.credentials, call.wait_for_ready)

    class UnaryUnary(grpc.aio.UnaryUnaryClientInterceptor):
        async def intercept_unary_unary(self, continuation: Any, call: Any, request: Any
                                        ) -> Any:
            return await continuation(details(call), request)

    class UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
        async def intercept_unary_stream(self, continuation: Any, call: Any, request: Any
                                         ) -> Any:
            return await continuation(details(call), request)

    class StreamUnary(grpc.aio.StreamUnaryClientInterceptor):
        async def intercept_stream_unary(self, continuation: Any, call: Any,
                                         requests: Any) -> Any:
            return await continuation(details(call), requests)

    class StreamStream(grpc.aio.StreamStreamClientInterceptor):
        async def intercept_stream_stream(self, continuation: Any, call: Any,
                                          requests: Any) -> Any:
            return await continuation(details(call), requests)

    return [UnaryUnary(), UnaryStream(), StreamUnary(), StreamStream()]
