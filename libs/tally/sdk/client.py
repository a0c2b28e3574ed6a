"""The typed async client for the four Tally services.

`TallyClient` opens one channel per service and exposes the generated, typed stubs
(`client.ledger.GetBalance(...)`). Every call carries the caller's identity (`x-tally-actor`)
and the current trace context, and a failed call (unary, or a stream while it is read, written
or awaited) raises `TallyError` with the server's stable reason instead of a bare
`AioRpcError`, so callers write `except TallyError as e: if e.reason is
Reason.INSUFFICIENT_CREDITS`.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Mapping
from types import TracebackType
from typing import Any, Self

import grpc
from opentelemetry.instrumentation.grpc import aio_client_interceptors

from tally.accounts.v1 import accounts_pb2_grpc
from tally.kit import errors
from tally.kit.config import KitConfig
from tally.ledger.v1 import billing_pb2_grpc, ledger_pb2_grpc
from tally.metering.v1 import metering_pb2_grpc
from tally.notifier.v1 import notifier_pb2_grpc
from tally.pricing.v1 import pricing_pb2_grpc

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.max_send_message_length", 32 * 1024 * 1024),
]


def _with_actor(details: grpc.aio.ClientCallDetails, actor: str,
                credential: str | None = None) -> grpc.aio.ClientCallDetails:
    metadata = grpc.aio.Metadata(*(details.metadata or ()))
    # A call's own actor and credentials win over the client's (the portal acts for the
    # signed-in person on the channels it holds as a service).
    if not metadata.get_all("x-tally-actor"):
        metadata.add("x-tally-actor", actor)
    if credential and not metadata.get_all("authorization"):
        metadata.add("authorization", f"Bearer {credential}")
    return grpc.aio.ClientCallDetails(
        details.method, details.timeout, metadata, details.credentials, details.wait_for_ready
    )


class _TallyErrors(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the actor to every unary call and turns a Tally status into `TallyError`."""

    def __init__(self, actor: str, credential: str | None = None) -> None:
        self._actor = actor
        self._credential = credential

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Awaitable[Any]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        call = await continuation(_with_actor(
            client_call_details, self._actor, self._credential), request)
        try:
            await call
        except grpc.aio.AioRpcError as exc:
            translated = errors.from_rpc_error(exc)
            if translated is not None:
                raise translated from exc
            raise
        return call


def _translated(exc: grpc.aio.AioRpcError) -> Exception:
    """The TallyError a failed call carries, else the call's own error."""
    return errors.from_rpc_error(exc) or exc


class _StreamCall:
    """A streaming call whose failures surface as `TallyError`, like unary calls'; control
    (cancel, metadata, status) goes to the real call."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def cancel(self) -> bool:
        return bool(self._call.cancel())

    def cancelled(self) -> bool:
        return bool(self._call.cancelled())

    def done(self) -> bool:
        return bool(self._call.done())

    def add_done_callback(self, callback: Any) -> None:
        self._call.add_done_callback(callback)

    def time_remaining(self) -> float | None:
        remaining: float | None = self._call.time_remaining()
        return remaining

    async def initial_metadata(self) -> Any:
        return await self._call.initial_metadata()

    async def trailing_metadata(self) -> Any:
        return await self._call.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        code: grpc.StatusCode = await self._call.code()
        return code

    async def details(self) -> str:
        return str(await self._call.details())

    async def debug_error_string(self) -> str:
        return str(await self._call.debug_error_string())

    async def wait_for_connection(self) -> None:
        await self._call.wait_for_connection()

    async def read(self) -> Any:
        try:
            return await self._call.read()
        except grpc.aio.AioRpcError as exc:
            raise _translated(exc) from exc

    def __aiter__(self) -> AsyncIterator[Any]:
        return self._responses()

    async def _responses(self) -> AsyncIterator[Any]:
        try:
            async for response in self._call:
                yield response
        except grpc.aio.AioRpcError as exc:
            raise _translated(exc) from exc

    async def write(self, request: Any) -> None:
        try:
            await self._call.write(request)
        except grpc.aio.AioRpcError as exc:
            raise _translated(exc) from exc

    async def done_writing(self) -> None:
        try:
            await self._call.done_writing()
        except grpc.aio.AioRpcError as exc:
            raise _translated(exc) from exc

    def __await__(self) -> Generator[Any, None, Any]:
        return self._response().__await__()

    async def _response(self) -> Any:
        try:
            return await self._call
        except grpc.aio.AioRpcError as exc:
            raise _translated(exc) from exc


class _UnaryStream(_StreamCall, grpc.aio.UnaryStreamCall[Any, Any]):
    """A server-streaming call."""


class _StreamUnary(_StreamCall, grpc.aio.StreamUnaryCall[Any, Any]):
    """A client-streaming call."""


class _StreamStream(_StreamCall, grpc.aio.StreamStreamCall[Any, Any]):
    """A bidirectional call."""


class _Streams(
    grpc.aio.UnaryStreamClientInterceptor,
    grpc.aio.StreamStreamClientInterceptor,
    grpc.aio.StreamUnaryClientInterceptor,
):
    """Adds the actor to streaming calls, and raises their failures as `TallyError` (where
    they surface: while reading, writing or awaiting the response)."""

    def __init__(self, actor: str, credential: str | None = None) -> None:
        self._actor = actor
        self._credential = credential

    async def intercept_unary_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, request: Any
    ) -> Any:
        return _UnaryStream(await continuation(_with_actor(
            client_call_details, self._actor, self._credential),
                                               request))

    async def intercept_stream_unary(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, requests: Any
    ) -> Any:
        return _StreamUnary(await continuation(_with_actor(
            client_call_details, self._actor, self._credential),
                                               requests))

    async def intercept_stream_stream(
        self, continuation: Any, client_call_details: grpc.aio.ClientCallDetails, requests: Any
    ) -> Any:
        return _StreamStream(await continuation(_with_actor(
            client_call_details, self._actor, self._credential),
                                                requests))


class TallyClient:
    """Typed async access to pricing, metering, ledger and notifier.

    Use as `async with TallyClient.from_config(config) as tally:` then
    `await tally.ledger.GetBalance(...)`.
    """

    def __init__(self, addresses: Mapping[str, str], *, actor: str = "service:sdk",
                 credential: str | None = None,
                 channel_credentials: grpc.ChannelCredentials | None = None) -> None:
        # `credential`: an API key (tly_...) or an OIDC token, sent as `authorization: Bearer`.
        # `channel_credentials`: TLS (e.g. mutual TLS with a service's certificate) for
        # services that serve only TLS; None: plaintext (a mesh's proxy, or development).
        interceptors: list[Any] = [
            *aio_client_interceptors(),  # type: ignore[no-untyped-call]
            _TallyErrors(actor, credential),
            _Streams(actor, credential),
        ]
        self._channels = {
            service: grpc.aio.secure_channel(
                address, channel_credentials, options=_CHANNEL_OPTIONS,
                interceptors=interceptors)
            if channel_credentials is not None else grpc.aio.insecure_channel(
                address, options=_CHANNEL_OPTIONS, interceptors=interceptors
            )
            for service, address in addresses.items()
        }
        self.pricing = pricing_pb2_grpc.PricingServiceStub(self._channel("pricing"))
        self.metering = metering_pb2_grpc.MeteringServiceStub(self._channel("metering"))
        self.ledger = ledger_pb2_grpc.LedgerServiceStub(self._channel("ledger"))
        self.billing = billing_pb2_grpc.BillingServiceStub(self._channel("ledger"))
        self.notifier = notifier_pb2_grpc.NotifierServiceStub(self._channel("notifier"))
        self.accounts = accounts_pb2_grpc.AccountsServiceStub(self._channel("accounts"))

    @classmethod
    def from_config(cls, config: KitConfig, *, actor: str = "service:sdk",
                    credential: str | None = None) -> Self:
        """A client for the services at their configured addresses; the credential is
        `credential`, else TALLY_API_KEY from the environment (if set)."""
        services = ("pricing", "metering", "ledger", "notifier", "accounts")
        return cls({s: config.address_of(s) for s in services}, actor=actor,
                   credential=credential or os.environ.get("TALLY_API_KEY") or None)

    def _channel(self, service: str) -> grpc.aio.Channel:
        # A client built for a subset of services still type-checks the others; calling them
        # fails fast with UNAVAILABLE on an address nobody listens on.
        if service not in self._channels:
            self._channels[service] = grpc.aio.insecure_channel("127.0.0.1:1")
        return self._channels[service]

    def channel(self, service: str) -> grpc.aio.Channel:
        """The channel to `service` (for health checks and reflection)."""
        return self._channel(service)

    async def close(self) -> None:
        """Closes every channel."""
        for channel in self._channels.values():
            await channel.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
