"""The one server bootstrap every service uses.

A service describes itself as a `ServiceApp` (its gRPC services, and what to start and stop
around them); `start_server` binds it on a grpc.aio server with the standard health service,
reflection, OpenTelemetry and the kit interceptor (auth hook, error mapping, access log);
`run_service` is a service's `main`: config, logging, telemetry, signals, graceful shutdown.

Shutdown order on SIGTERM/SIGINT (what Kubernetes and a mesh need): health turns NOT_SERVING
for every service, the server keeps answering for `TALLY_SHUTDOWN_DRAIN_DELAY_MS` so load
balancers notice, then stops accepting calls, lets in-flight calls finish within
`TALLY_SHUTDOWN_GRACE_SECONDS`, and only then closes pools.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from opentelemetry.instrumentation.grpc import aio_server_interceptor, filters

from tally.kit import errors
from tally.kit.config import ConfigError, KitConfig, exit_on_config_error, load_kit_config
from tally.kit.log import configure_logging, get_logger
from tally.kit.telemetry import setup_telemetry, shutdown_telemetry

log = get_logger("tally.kit.server")

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


# --- auth hook ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a user, an API key or another service."""

    identity: str
    roles: frozenset[str] = frozenset()


class Authenticator(Protocol):
    """Decides who a call comes from; raises TallyError(UNAUTHENTICATED/PERMISSION_DENIED)."""

    async def authenticate(self, method: str, metadata: Mapping[str, str]) -> Principal:
        """Returns the caller for `method` given the call's metadata."""
        ...


class TrustInternalCallers:
    """The default until identity lands: every caller is trusted as the identity it names.

    The `x-tally-actor` metadata (if any) becomes the principal, so audit fields are filled.
    """

    async def authenticate(self, method: str, metadata: Mapping[str, str]) -> Principal:
        """Trusts the caller (internal network; mTLS in the mesh)."""
        return Principal(identity=metadata.get("x-tally-actor", "service:anonymous"))


current_principal: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "current_principal", default=None
)


# --- the kit interceptor ------------------------------------------------------------------

_AUTH_EXEMPT_PREFIXES = ("/grpc.health.", "/grpc.reflection.")


class KitInterceptor(grpc.aio.ServerInterceptor):
    """Auth hook, domain-error mapping and the access log, in one layer (one hop per call)."""

    def __init__(self, authenticator: Authenticator) -> None:
        self._authenticator = authenticator

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any] | None]
        ],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method: str = handler_call_details.method
        if method.startswith(_AUTH_EXEMPT_PREFIXES):
            return handler
        return _wrap(handler, method, self._authenticator)


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: errors.TallyError) -> None:
    status = errors.to_status_proto(error)
    await context.abort(
        error.code,
        error.message,
        trailing_metadata=((errors.STATUS_DETAILS_KEY, status.SerializeToString()),),
    )


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    found: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if isinstance(value, str):
            found[key] = value
    return found


class _CallScope:
    """Authenticates, maps errors and logs one call; shared by the four handler shapes."""

    def __init__(self, method: str, authenticator: Authenticator) -> None:
        self.method = method
        self.authenticator = authenticator

    async def enter(self, context: grpc.aio.ServicerContext[Any, Any]) -> float:
        principal = await self.authenticator.authenticate(self.method, _metadata(context))
        current_principal.set(principal)
        return time.perf_counter()

    async def fail(
        self, context: grpc.aio.ServicerContext[Any, Any], exc: Exception, started: float
    ) -> None:
        elapsed_ms = round((time.perf_counter() - started) * 1000, 3)
        if isinstance(exc, NotImplementedError):
            # a contract RPC whose issue has not landed yet (the generated base raises this)
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{self.method} is not implemented")
        if isinstance(exc, errors.TallyError):
            log.info("rpc_failed", method=self.method, reason=exc.reason.value,
                     code=exc.code.name, duration_ms=elapsed_ms)
            await _abort(context, exc)
        log.error("rpc_crashed", method=self.method, duration_ms=elapsed_ms, exc_info=exc)
        await _abort(context, errors.TallyError(errors.Reason.INTERNAL, "internal error"))

    def done(self, started: float) -> None:
        log.debug("rpc_ok", method=self.method,
                  duration_ms=round((time.perf_counter() - started) * 1000, 3))


def _wrap(
    handler: grpc.RpcMethodHandler[Any, Any], method: str, authenticator: Authenticator
) -> grpc.RpcMethodHandler[Any, Any]:
    scope = _CallScope(method, authenticator)
    h: Any = handler
    if h.unary_unary or h.stream_unary:
        inner = h.unary_unary or h.stream_unary

        async def unary_response(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            try:
                started = await scope.enter(context)
                response = await inner(request, context)
            except grpc.aio.AbortError:
                raise
            except Exception as exc:
                await scope.fail(context, exc, started)
            scope.done(started)
            return response

        make = (grpc.unary_unary_rpc_method_handler if h.unary_unary
                else grpc.stream_unary_rpc_method_handler)
        return make(unary_response, h.request_deserializer, h.response_serializer)

    inner = h.unary_stream or h.stream_stream

    async def streaming_response(request: Any, context: Any) -> AsyncIterator[Any]:
        started = time.perf_counter()
        try:
            started = await scope.enter(context)
            produced = inner(request, context)
            if inspect.isasyncgen(produced):
                async for item in produced:
                    yield item
            else:  # a handler that writes with context.write and returns None
                await produced
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            await scope.fail(context, exc, started)
        scope.done(started)

    make = (grpc.unary_stream_rpc_method_handler if h.unary_stream
            else grpc.stream_stream_rpc_method_handler)
    return make(streaming_response, h.request_deserializer, h.response_serializer)


# --- the app and its server ---------------------------------------------------------------

Hook = Callable[[], Awaitable[None]]


@dataclass
class ServiceApp:
    """What a service's composition root hands the kit."""

    name: str
    """Short name: pricing, metering, ledger or notifier."""
    service_names: Sequence[str]
    """Fully qualified gRPC service names, for health and reflection."""
    register: Callable[[grpc.aio.Server], None]
    """Adds the servicers to the server."""
    on_start: list[Hook] = field(default_factory=list)
    """Run after the port is bound, before SERVING (start background loops here)."""
    on_stop: list[Hook] = field(default_factory=list)
    """Run after in-flight calls have drained (stop loops, close pools)."""


@dataclass
class RunningServer:
    """A started server: its port, health servicer, and how to stop it gracefully."""

    app: ServiceApp
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    grace_seconds: float
    drain_delay_seconds: float
    _stopped: bool = False

    async def stop(self) -> None:
        """NOT_SERVING, drain delay, stop accepting, finish in-flight calls, run on_stop."""
        if self._stopped:
            return
        self._stopped = True
        await self.health.enter_graceful_shutdown()
        log.info("shutdown_begin", service=self.app.name, grace_s=self.grace_seconds)
        if self.drain_delay_seconds:
            await asyncio.sleep(self.drain_delay_seconds)
        await self.server.stop(self.grace_seconds)
        for hook in reversed(self.app.on_stop):
            await hook()
        log.info("shutdown_done", service=self.app.name)


async def start_server(
    app: ServiceApp,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    grace_seconds: float = 10.0,
    drain_delay_seconds: float = 0.0,
    authenticator: Authenticator | None = None,
) -> RunningServer:
    """Builds, binds and starts `app`; returns once every service reports SERVING."""
    server = grpc.aio.server(
        interceptors=[
            # Health probes and reflection are infrastructure, not requests worth a trace (and
            # the OTel wrapper cannot wrap the write()-style Watch handler).
            aio_server_interceptor(  # type: ignore[no-untyped-call]
                filter_=filters.negate(
                    filters.any_of(
                        filters.service_prefix("grpc.health."),
                        filters.service_prefix("grpc.reflection."),
                    )
                )
            ),
            KitInterceptor(authenticator or TrustInternalCallers()),
        ],
        options=[
            ("grpc.max_receive_message_length", 32 * 1024 * 1024),
            ("grpc.so_reuseport", 0),
        ],
    )
    app.register(server)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*app.service_names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"{app.name}: could not bind {host}:{port}")
    await server.start()
    for hook in app.on_start:
        await hook()
    for name in ["", *app.service_names]:
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("serving", service=app.name, address=f"{host}:{bound}")
    return RunningServer(app, server, bound, health, grace_seconds, drain_delay_seconds)


def run_service(
    name: str, build: Callable[[KitConfig], Awaitable[ServiceApp]], *, port: int | None = None
) -> None:
    """A service's `main`: read config, set up logs and traces, serve until SIGTERM/SIGINT.

    The port is the configured `TALLY_<NAME>_PORT` unless `port` is given.
    """
    try:
        config = load_kit_config()
    except ConfigError as exc:
        exit_on_config_error(exc)
        return
    configure_logging(name, config.log_level)
    setup_telemetry(name)
    try:
        # uvloop: the same asyncio, with a faster event loop for gRPC and asyncpg.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve_until_signalled(name, config, build, port))
    finally:
        shutdown_telemetry()


async def _serve_until_signalled(
    name: str,
    config: KitConfig,
    build: Callable[[KitConfig], Awaitable[ServiceApp]],
    port: int | None,
) -> None:
    app = await build(config)
    running = await start_server(
        app,
        host=config.host,
        port=config.port_of(name) if port is None else port,
        grace_seconds=config.shutdown_grace_seconds,
        drain_delay_seconds=config.shutdown_drain_delay_ms / 1000,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop()
