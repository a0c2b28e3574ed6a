"""Channels from one service to another, one way for every service.

Each outgoing call carries the caller's trace (OpenTelemetry client interceptors: a client
span, and W3C traceparent headers the peer's server span continues), and a channel whose
peer went away reconnects within a second once it is back (gRPC's default backoff grows to
two minutes).
"""

from __future__ import annotations

from typing import Any, Final

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

OPTIONS: Final = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.max_send_message_length", 32 * 1024 * 1024),
]


def peer_channel(address: str) -> grpc.aio.Channel:
    """A traced channel to the service at `address` (host:port); mutual TLS with this
    process's certificate when TALLY_TLS_CERT / _KEY / _CA are set (tally.kit.tls)."""
    from tally.kit import tls

    interceptors: list[Any] = list(aio_client_interceptors())  # type: ignore[no-untyped-call]
    files = tls.client_files()
    if files is not None:
        return grpc.aio.secure_channel(address, tls.channel_credentials(files), options=OPTIONS,
                                       interceptors=interceptors)
    return grpc.aio.insecure_channel(address, options=OPTIONS, interceptors=interceptors)
