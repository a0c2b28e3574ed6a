"""The one server bootstrap every service uses.

A service describes itself as a `ServiceApp` (its gRPC services, and what to start and stop
around them); `start_server` binds it on a grpc.aio server with the standard health service,
reflection and the kit interceptor (OpenTelemetry server spans, auth hook, error mapping,
access log); `run_service` is a service's `main`: config, logging, telemetry, signals,
graceful shutdown.

Shutdown order on SIGTERM/SIGINT (what Kubernetes and a mesh need): health turns NOT_SERVING
for every service and `ServiceApp.shutting_down` is set, so long-lived server streams end
cleanly at once (see `until_shutdown`); the server keeps answering for
`TALLY_SHUTDOWN_DRAIN_DELAY_MS` so load balancers notice, then stops accepting calls, lets
in-flight calls finish within `TALLY_SHUTDOWN_GRACE_SECONDS`, and only then closes pools.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import signal
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Protocol, TypeVar
from urllib.parse import unquote

import grpc
import uvloop
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio
from grpc_reflection.v1alpha import reflection
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import Status, StatusCode

from tally.kit import audit, errors, metrics
from tally.kit.config import ConfigError, KitConfig, exit_on_config_error, load_kit_config
from tally.kit.log import configure_logging, get_logger
from tally.kit.readiness import Probe, Readiness, is_outage
from tally.kit.requests import Refused, checked_decoder, unstorable
from tally.kit.telemetry import setup_telemetry, shutdown_telemetry

log = get_logger("tally.kit.server")

HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name

_T = TypeVar("_T")


# --- auth hook ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: a user, an API key or another service (see tally.kit.auth)."""

    identity: str
    roles: frozenset[str] = frozenset()
    """Roles that hold in every org (a service's), or in `bound_orgs` when that is set."""
    verified_by: str = "trusted"
    """api_key, oidc, mtls, or trusted (development mode: nothing was verified)."""
    org_roles: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Roles held in one org each (a person's memberships, an API key's org)."""
    bound_orgs: frozenset[str] | None = None
    """The orgs a service's `roles` are limited to; None = every org."""
    project_id: str = ""
    """The project an API key is limited to; empty = its whole org."""
    environment_id: str = ""
    """The environment an API key is limited to; empty = its whole project."""

    @property
    def is_verified(self) -> bool:
        """Whether the identity was proven (not merely claimed in development mode)."""
        return self.verified_by != "trusted"

    def roles_in(self, org_id: str) -> frozenset[str]:
        """Every role the principal holds in `org_id`."""
        held = self.org_roles.get(org_id, frozenset())
        if self.roles and (self.bound_orgs is None or org_id in self.bound_orgs):
            return held | self.roles
        return held

    def all_roles(self) -> frozenset[str]:
        """Every role held anywhere."""
        return self.roles.union(*self.org_roles.values())


def acting_identity(claimed: str) -> str:
    """Who a change is recorded as: the verified principal, whatever the request claims; in
    development mode the claimed actor (else the trusted principal's name)."""
    principal = current_principal.get()
    if principal is not None and principal.is_verified:
        return principal.identity
    return claimed or (principal.identity if principal else "service:anonymous")


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

# Health probes and reflection are infrastructure: no trace, no auth, no access log.
_INFRASTRUCTURE_PREFIXES = ("/grpc.health.", "/grpc.reflection.")

# OpenTelemetry semantic conventions for RPC server spans (the attributes
# opentelemetry-instrumentation-grpc sets, so dashboards built on it keep working).
_RPC_SYSTEM = "rpc.system"
_RPC_SERVICE = "rpc.service"
_RPC_METHOD = "rpc.method"
_RPC_STATUS_CODE = "rpc.grpc.status_code"
_RPC_USER_AGENT = "rpc.user_agent"
_NET_PEER_IP = "net.peer.ip"
_NET_PEER_PORT = "net.peer.port"
_NET_PEER_NAME = "net.peer.name"
# Codes that are the server's fault: a server span ends in ERROR only for these (the spec's
# rule; a client's bad argument or a denied request is not a server error).
_SERVER_ERROR_CODES = frozenset({
    grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNIMPLEMENTED,
    grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS,
})
_NO_PARENT = otel_context.Context()  # an RPC without trace headers starts a new trace
_OUTAGE_MESSAGE = "a dependency of this service is unreachable; retry"
_OUTAGE_RETRY_AFTER = timedelta(seconds=1)
_STOPPING_MESSAGE = "this replica is shutting down; retry"
_QUIET_S = 0.05  # no call refused for this long: gRPC holds no call a stop would cut
_MAX_REFUSING_S = 2.0  # clients retrying at once never let it go quiet: stop anyway
_UNSTORABLE_MESSAGE = "a value of the request is too long or out of range"


class KitInterceptor(grpc.aio.ServerInterceptor):
    """Tracing, the auth hook, domain-error mapping and the access log, in one layer.

    One hop per call, and per-method work done once: each method's wrapped handler, span name
    and span attributes are built on its first call and reused (Quote's latency budget is a
    fraction of a millisecond; see bench/pricing.py).

    The server span follows the OpenTelemetry RPC conventions: named after the full method,
    parented to the caller's propagated context, with `rpc.*` / `net.peer.*` attributes and
    `rpc.grpc.status_code`, in ERROR for server-side codes, with a crash's exception
    recorded. It is current while the handler runs, so logs and outgoing calls carry it.
    """

    def __init__(self, authenticator: Authenticator,
                 tracer_provider: trace.TracerProvider | None = None) -> None:
        self._authenticator = authenticator
        # A ProxyTracer until setup_telemetry installs the provider, then the real one.
        self._tracer = trace.get_tracer("tally.kit.server", tracer_provider=tracer_provider)
        self._propagated = frozenset(propagate.get_global_textmap().fields)
        # Bound now (start_server runs after configure_logging): a per-call lazy logger costs
        # a bind per line even when the level filters the line out.
        self._log = log.bind()
        is_enabled_for = getattr(self._log, "is_enabled_for", None)
        self._logs_ok = is_enabled_for(logging.DEBUG) if is_enabled_for else True
        self._wrapped: dict[str, tuple[Any, grpc.RpcMethodHandler[Any, Any]]] = {}
        self.readiness: Readiness | None = None
        """Told of every dependency outage a call meets (start_server sets it)."""
        self.refusing = False
        """Set by RunningServer.stop after the drain delay: new calls get UNAVAILABLE."""
        self.last_refused = 0.0
        """When (time.monotonic) the last call was refused for the shutdown."""

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
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped = (handler if method.startswith(_INFRASTRUCTURE_PREFIXES)
                   else _wrap(handler, _Method(method, self)))
        # Bounded: only methods some server registered get here (unknown ones have no handler).
        self._wrapped[method] = (handler, wrapped)
        return wrapped


async def _abort(context: grpc.aio.ServicerContext[Any, Any], error: errors.TallyError) -> None:
    error = errors.bounded(error)  # a message echoing a 1 MB id would exceed header limits
    status = errors.to_status_proto(error)
    await context.abort(
        error.code,
        error.message,
        trailing_metadata=((errors.STATUS_DETAILS_KEY, status.SerializeToString()),),
    )


def _metadata(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    return {key: value for key, value in context.invocation_metadata() or ()
            if value.__class__ is str}


class _Method:
    """What every call of one method shares: names, span attributes, tracer, logger, and its
    metric series (looked up once, not per call)."""

    __slots__ = ("attributes", "authenticator", "counted", "duration", "interceptor", "log",
                 "logs_ok", "name", "propagated", "record", "service", "short", "tracer")

    def __init__(self, name: str, interceptor: KitInterceptor) -> None:
        self.name = name
        service, _, short = name.lstrip("/").partition("/")
        self.service, self.short = service, short
        self.attributes = {_RPC_SYSTEM: "grpc", _RPC_SERVICE: service, _RPC_METHOD: short}
        self.duration = metrics.RPC_DURATION.labels(service, short)
        self.counted: dict[grpc.StatusCode, Any] = {}
        self.authenticator = interceptor._authenticator
        # the audit hook of a guard (tally.kit.auth): told how every call ended
        self.record = getattr(self.authenticator, "record", None)
        self.tracer = interceptor._tracer
        self.propagated = interceptor._propagated
        self.log = interceptor._log
        self.logs_ok = interceptor._logs_ok
        self.interceptor = interceptor


class _Call:
    """Traces, authenticates, maps errors and logs one call; shared by the four shapes."""

    __slots__ = ("code", "context", "details", "ended", "metadata", "method", "principal",
                 "recorded", "request", "span", "started", "token")

    def __init__(self, method: _Method, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        self.started = time.perf_counter()
        self.method = method
        self.context = context
        self.code: grpc.StatusCode | None = None
        self.details = ""
        self.ended = False
        self.principal: Any = None
        self.request: Any = None
        self.recorded: Awaitable[Any] | None = None
        metadata = _metadata(context)
        parent = (propagate.extract(metadata) if not method.propagated.isdisjoint(metadata)
                  else _NO_PARENT)
        self.span = method.tracer.start_span(method.name, parent, trace.SpanKind.SERVER,
                                             method.attributes)
        self.token = otel_context.attach(trace.set_span_in_context(self.span, parent))
        if self.span.is_recording():
            _describe_peer(self.span, context.peer(), metadata)
        self.metadata = metadata

    async def enter(self, request: Any = None) -> Any:
        """Authenticates (and, with a guard, authorizes) the call before its handler runs;
        returns the principal. `request` is None at a client stream's open."""
        interceptor = self.method.interceptor
        if interceptor.refusing:
            # Stopping: a call taken now would be cut (CANCELLED) when the server stops, so
            # it is refused with a status clients retry, on another replica.
            interceptor.last_refused = time.monotonic()
            metrics.RPC_REFUSED_SHUTTING_DOWN.labels(self.method.service,
                                                     self.method.short).inc()
            self.method.log.info("rpc_refused_shutting_down", method=self.method.name)
            raise errors.TallyError(errors.Reason.UNAVAILABLE, _STOPPING_MESSAGE,
                                    retry_after=timedelta(0))
        authenticator: Any = self.method.authenticator
        self.request = request
        if hasattr(authenticator, "check"):  # a guard: verify, then the policy
            principal = await authenticator.verify(self.metadata, self.context)
            self.principal = principal  # known to the audit record even when refused
            authenticator.check(principal, self.method.name, request)
            if request is not None:  # its handler may write the record with its change
                audit.begin(authenticator.pending(self.method.name, principal, self.context,
                                                  request))
        else:
            principal = await authenticator.authenticate(self.method.name, self.metadata)
            self.principal = principal
        current_principal.set(principal)
        return principal

    async def admit(self, request: Any, streamed_in: bool) -> Any:
        """`enter` for the request as the handler will get it: a client stream's messages
        each checked as they come, undecodable bytes refused once the caller is verified."""
        if streamed_in:
            return self.checked(_checked_stream(request), await self.enter())
        if request.__class__ is Refused:
            await self.enter()
            raise request.error
        await self.enter(request)
        return request

    def checked(self, requests: AsyncIterable[Any], principal: Any) -> AsyncIterable[Any]:
        """A client stream's messages, each checked for the orgs it names."""
        check = getattr(self.method.authenticator, "check_message", None)
        if check is None:
            return requests

        async def each() -> AsyncIterator[Any]:
            async for message in requests:
                check(principal, self.method.name, message)
                yield message

        return each()

    def aborted(self) -> None:
        """The handler aborted the call itself: its status is on the context."""
        self.code = self.context.code() or grpc.StatusCode.UNKNOWN
        self.details = self.context.details() or ""

    async def fail(self, exc: Exception) -> None:
        """Maps `exc` to its status, records it, and aborts the call (raises AbortError)."""
        method = self.method
        elapsed_ms = round((time.perf_counter() - self.started) * 1000, 3)
        if isinstance(exc, NotImplementedError):
            # a contract RPC whose issue has not landed yet (the generated base raises this)
            self.code, self.details = (grpc.StatusCode.UNIMPLEMENTED,
                                       f"{method.name} is not implemented")
            self.end()
            await self.context.abort(self.code, self.details)
        if isinstance(exc, errors.TallyError):
            self.code, self.details = exc.code, exc.message
            method.log.info("rpc_failed", method=method.name, reason=exc.reason.value,
                            code=exc.code.name, duration_ms=elapsed_ms)
            self.end()
            await _abort(self.context, exc)
        if is_outage(exc):
            # A dependency (PostgreSQL, Redis) is unreachable: retryable, and not this
            # replica's bug. Readiness turns NOT_SERVING until its probes pass again.
            readiness = method.interceptor.readiness
            if readiness is not None:
                readiness.outage_seen(exc)
            self.code, self.details = grpc.StatusCode.UNAVAILABLE, _OUTAGE_MESSAGE
            if self.span.is_recording():
                self.span.record_exception(exc)
            method.log.warning("rpc_unavailable", method=method.name, duration_ms=elapsed_ms,
                               error=repr(exc))
            self.end()
            await _abort(self.context, errors.TallyError(
                errors.Reason.UNAVAILABLE, _OUTAGE_MESSAGE, retry_after=_OUTAGE_RETRY_AFTER))
        if unstorable(exc):
            # the handler let a value through that the database or arithmetic cannot hold
            self.code, self.details = grpc.StatusCode.INVALID_ARGUMENT, _UNSTORABLE_MESSAGE
            method.log.warning("rpc_unstorable_value", method=method.name,
                               duration_ms=elapsed_ms, error=repr(exc))
            self.end()
            await _abort(self.context, errors.TallyError(errors.Reason.INVALID_ARGUMENT,
                                                         _UNSTORABLE_MESSAGE))
        self.code, self.details = grpc.StatusCode.INTERNAL, "internal error"
        if self.span.is_recording():
            self.span.record_exception(exc)
        method.log.error("rpc_crashed", method=method.name, duration_ms=elapsed_ms,
                         exc_info=exc)
        self.end()
        await _abort(self.context, errors.TallyError(errors.Reason.INTERNAL, "internal error"))

    async def durable(self) -> None:
        """Waits until the call's audit record is durable; a call whose record cannot be
        written answers UNAVAILABLE instead of OK (its change is idempotent: the retry is
        audited)."""
        assert self.recorded is not None
        try:
            await self.recorded
        except Exception as exc:
            self.method.log.error("audit_record_not_written", method=self.method.name,
                                  error=repr(exc))
            await _abort(self.context, errors.TallyError(
                errors.Reason.UNAVAILABLE, "the audit trail could not be written; the call "
                "took effect and is idempotent: retry it", retry_after=_OUTAGE_RETRY_AFTER))

    def cancelled(self) -> None:
        """The caller went away (or the server is stopping past its grace)."""
        self.code = grpc.StatusCode.CANCELLED

    def end(self) -> None:
        """Ends the span (status from the outcome), records the golden signals and writes the
        access log line; once. A failure ends it before the status goes out, so whoever sees
        the status can also see the finished span."""
        if self.ended:
            return
        self.ended = True
        span = self.span
        code = self.code or self.context.code() or grpc.StatusCode.OK
        method = self.method
        method.duration.observe(time.perf_counter() - self.started)
        counter = method.counted.get(code)
        if counter is None:
            counter = method.counted[code] = metrics.RPC_REQUESTS.labels(
                method.service, method.short, code.name)
        counter.inc()
        if span.is_recording():
            span.set_attribute(_RPC_STATUS_CODE, code.value[0])
            if code in _SERVER_ERROR_CODES:
                details = self.details or self.context.details() or ""
                span.set_status(Status(StatusCode.ERROR, f"{code}:{details}"))
        span.end()
        otel_context.detach(self.token)
        if method.record is not None:
            self.recorded = method.record(method.name, self.principal, self.context,
                                          self.request, code)
        if self.code is None and self.method.logs_ok:
            self.method.log.debug("rpc_ok", method=self.method.name, duration_ms=round(
                (time.perf_counter() - self.started) * 1000, 3))


def _describe_peer(span: trace.Span, peer: str, metadata: Mapping[str, str]) -> None:
    # peer looks like ipv4:127.0.0.1:57284, ipv6:[::1]:57284 or unix:/path
    agent = metadata.get("user-agent")
    if agent:
        span.set_attribute(_RPC_USER_AGENT, agent)
    if peer.startswith("unix:"):
        return
    address = peer.split(",")[0].partition(":")[2]
    ip, _, port = address.rpartition(":")
    if not ip:
        return
    ip = unquote(ip)
    span.set_attribute(_NET_PEER_IP, ip)
    span.set_attribute(_NET_PEER_PORT, port)
    if ip in ("[::1]", "127.0.0.1"):
        span.set_attribute(_NET_PEER_NAME, "localhost")


def _wrap(handler: grpc.RpcMethodHandler[Any, Any], method: _Method
          ) -> grpc.RpcMethodHandler[Any, Any]:
    h: Any = handler
    decoder = (checked_decoder(h.request_deserializer) if h.request_deserializer is not None
               else None)
    if h.unary_unary or h.stream_unary:
        inner = h.unary_unary or h.stream_unary

        streamed = bool(h.stream_unary)

        async def unary_response(request: Any, context: Any) -> Any:
            call = _Call(method, context)
            try:
                request = await call.admit(request, streamed)
                response = await inner(request, context)
                call.end()
                if call.recorded is not None:
                    await call.durable()
                return response
            except grpc.aio.AbortError:
                if call.code is None:
                    call.aborted()
                raise
            except asyncio.CancelledError:
                call.cancelled()
                raise
            except Exception as exc:
                await call.fail(exc)
                raise  # unreachable: fail aborts
            finally:
                call.end()

        make = (grpc.unary_unary_rpc_method_handler if h.unary_unary
                else grpc.stream_unary_rpc_method_handler)
        return make(unary_response, decoder, h.response_serializer)

    inner = h.unary_stream or h.stream_stream
    streamed_in = bool(h.stream_stream)

    async def streaming_response(request: Any, context: Any) -> AsyncIterator[Any]:
        call = _Call(method, context)
        try:
            request = await call.admit(request, streamed_in)
            produced = inner(request, context)
            if inspect.isasyncgen(produced):
                async for item in produced:
                    yield item
            else:  # a handler that writes with context.write and returns None
                await produced
        except grpc.aio.AbortError:
            if call.code is None:
                call.aborted()
            raise
        except (asyncio.CancelledError, GeneratorExit):
            call.cancelled()
            raise
        except Exception as exc:
            await call.fail(exc)
        finally:
            call.end()

    make = (grpc.unary_stream_rpc_method_handler if h.unary_stream
            else grpc.stream_stream_rpc_method_handler)
    return make(streaming_response, decoder, h.response_serializer)


async def _checked_stream(requests: AsyncIterable[Any]) -> AsyncIterator[Any]:
    """A client stream's requests; one the kit refused (undecodable, a NUL) ends the call
    with its INVALID_ARGUMENT."""
    async for request in requests:
        if request.__class__ is Refused:
            raise request.error
        yield request


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
    shutting_down: asyncio.Event = field(default_factory=asyncio.Event)
    """Set when shutdown begins (before the drain delay). Long-lived streams end on it through
    `until_shutdown`; the composition root hands the same event to its servicer."""
    audit_database_url: str | None = None
    """The service's own database: audit records are made durable there (its
    `<name>.audit_outbox`) before their call answers (tally.kit.audit)."""
    readiness_probes: list[Probe] = field(default_factory=list)
    """Cheap checks of the dependencies the service cannot work without (its database; Redis
    where hard quotas need it): NOT_SERVING while one fails (see tally.kit.readiness)."""
    http_urls: dict[str, str] = field(default_factory=dict)
    """Base URLs of what the service serves over HTTP beside gRPC (the ledger's webhooks),
    filled in once bound: a port configured as 0 is known only then."""


async def until_shutdown(items: AsyncIterable[_T], shutting_down: asyncio.Event
                         ) -> AsyncIterator[_T]:
    """`items`, until the server begins shutting down; then `items` is closed and this ends.

    Without it a long-lived stream holds a stopping server for its whole grace period, and its
    subscriber only learns of the shutdown when the call is cancelled. With it the stream ends
    cleanly (status OK) as soon as shutdown begins, so the subscriber reconnects, to another
    replica once load balancers see NOT_SERVING; unary calls still finish within the grace.
    A stream opened after shutdown began ends at once.

    A wait for the next item is interrupted the way `asyncio.timeout` interrupts (a
    cancellation of the calling task, taken back here), so `items` runs in the call's own task:
    its context variables, timeouts and `finally` blocks behave as without the wrapper. An
    item that arrives at the very moment of the interruption may be dropped; the caller
    resyncs when it reconnects.

    A server stream wraps what it sends (pricing's WatchPriceBook)::

        async for book in until_shutdown(self.pricing.watch(...), self.shutting_down):
            yield pb.WatchPriceBookResponse(book=...)

    A bidirectional stream wraps what it reads, so it stops taking new requests, finishes
    and acknowledges those already taken, then returns (metering's StreamUsage)::

        async for batch in until_shutdown(request_iterator, self.shutting_down):
            ...                  # submit the batch, yield acks as commits complete
        ...                      # shutdown or half-close: await in-flight commits, yield acks

    `shutting_down` is the `ServiceApp.shutting_down` of the server that serves the call.
    """
    task = asyncio.current_task()
    if task is None:
        raise RuntimeError("until_shutdown needs a running task")
    iterator = aiter(items)
    reading = interrupted = False

    def interrupt(_: object) -> None:
        nonlocal interrupted
        if reading and not interrupted:
            interrupted = True
            task.cancel()

    waiter = asyncio.ensure_future(shutting_down.wait())
    waiter.add_done_callback(interrupt)
    try:
        while not shutting_down.is_set():
            reading = True
            try:
                item = await anext(iterator)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if interrupted and task.uncancel() == 0:
                    return  # only our interruption: a clean end
                raise  # the call itself was cancelled too
            finally:
                reading = False
            yield item
    finally:
        waiter.remove_done_callback(interrupt)
        waiter.cancel()
        close = getattr(iterator, "aclose", None)
        if close is not None:
            await close()


@dataclass
class RunningServer:
    """A started server: its port, health servicer, and how to stop it gracefully."""

    app: ServiceApp
    server: grpc.aio.Server
    port: int
    health: health_aio.HealthServicer
    grace_seconds: float
    drain_delay_seconds: float
    readiness: Readiness | None = None
    interceptor: KitInterceptor | None = None
    health_server: grpc.aio.Server | None = None
    """The plaintext health-only server beside an mTLS port (TALLY_HEALTH_PORT)."""
    _stopped: bool = False

    async def _refuse_until_quiet(self, limit_s: float) -> float:
        """New calls get UNAVAILABLE until none has come for _QUIET_S, for at most
        min(limit_s, _MAX_REFUSING_S); returns the seconds it took.

        gRPC drops the calls it has accepted but not yet handed to a handler when the server
        stops: the caller sees CANCELLED, which it does not retry, and nothing logs or counts
        them. Refusing first, until calls stop coming, leaves none in that state."""
        interceptor = self.interceptor
        if interceptor is None:
            return 0.0
        interceptor.refusing = True
        interceptor.last_refused = started = time.monotonic()
        limit_s = min(limit_s, _MAX_REFUSING_S)
        while True:
            now = time.monotonic()
            if now - interceptor.last_refused >= _QUIET_S or now - started >= limit_s:
                return now - started
            await asyncio.sleep(_QUIET_S)

    async def stop(self) -> None:
        """NOT_SERVING and end long-lived streams, drain delay, refuse new calls until they
        stop coming, stop accepting, finish in-flight calls, run on_stop."""
        if self._stopped:
            return
        self._stopped = True
        if self.readiness is not None:
            await self.readiness.close()
        await self.health.enter_graceful_shutdown()
        self.app.shutting_down.set()  # long-lived streams end now, not at the grace deadline
        log.info("shutdown_begin", service=self.app.name, grace_s=self.grace_seconds)
        if self.drain_delay_seconds:
            await asyncio.sleep(self.drain_delay_seconds)
        # in-flight calls keep running while new ones are refused: that time is grace spent
        refused_for_s = await self._refuse_until_quiet(self.grace_seconds / 2)
        log.info("shutdown_stopping", service=self.app.name,
                 refused_for_s=round(refused_for_s, 3))
        await self.server.stop(max(self.grace_seconds - refused_for_s, 0.0))
        if self.health_server is not None:
            await self.health_server.stop(0)
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
    reuse_port: bool = False,
    tls: Any = None,
    health_port: int = 0,
) -> RunningServer:
    """Builds, binds and starts `app`; returns once every service reports SERVING. With
    `reuse_port`, several processes may serve one port (SO_REUSEPORT: the kernel spreads
    connections over them); without, a port already taken is an error.

    Without an `authenticator`, the one TALLY_AUTH_MODE configures (tally.kit.auth): the
    guard, following accounts' credentials feed at TALLY_ACCOUNTS_ADDRESS, unless
    development mode (trust) is asked for. With `tls` (a tally.kit.tls.TlsFiles; else
    TALLY_TLS_CERT / _KEY / _CLIENT_CA) the port serves mutual TLS only; `health_port` then
    serves the gRPC health service alone, in plaintext, for probes that cannot speak TLS
    (the kubelet's): nothing but health is reachable there."""
    if authenticator is None:
        from tally.kit.auth import build_authenticator

        authenticator = build_authenticator(load_kit_config().address_of("accounts"), app.name,
                                            audit_database_url=app.audit_database_url)
    interceptor = KitInterceptor(authenticator)
    server = grpc.aio.server(
        interceptors=[interceptor],
        options=[
            ("grpc.max_receive_message_length", 32 * 1024 * 1024),
            ("grpc.so_reuseport", 1 if reuse_port else 0),
        ],
    )
    app.register(server)
    health = _ReadinessHealth()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [*app.service_names, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    from tally.kit import tls as kit_tls

    files = tls if tls is not None else kit_tls.server_files()
    if files is not None:  # mTLS only: no plaintext port beside it
        bound = server.add_secure_port(f"{host}:{port}", kit_tls.server_credentials(files))
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"{app.name}: could not bind {host}:{port}")
    health_server = None
    if health_port:
        health_server = grpc.aio.server(
            options=[("grpc.so_reuseport", 1 if reuse_port else 0)])
        health_pb2_grpc.add_HealthServicer_to_server(health, health_server)
        if health_server.add_insecure_port(f"{host}:{health_port}") == 0:
            raise OSError(f"{app.name}: could not bind health port {host}:{health_port}")
        await health_server.start()
    await server.start()
    start_auth = getattr(authenticator, "start", None)
    if start_auth is not None:
        await start_auth()
        stop_auth = getattr(authenticator, "stop")  # noqa: B009 - optional hook
        app.on_stop.insert(0, stop_auth)  # runs last: on_stop hooks run in reverse
    for hook in app.on_start:
        await hook()

    async def set_serving(serving: bool) -> None:
        status = (health_pb2.HealthCheckResponse.SERVING if serving
                  else health_pb2.HealthCheckResponse.NOT_SERVING)
        for name in ["", *app.service_names]:
            await health.set(name, status)  # ignored once shutdown has begun

    readiness = Readiness(app.name, app.readiness_probes, set_serving)
    interceptor.readiness = health.readiness = readiness
    await set_serving(True)
    log.info("serving", service=app.name, address=f"{host}:{bound}")
    return RunningServer(app, server, bound, health, grace_seconds, drain_delay_seconds,
                         readiness, interceptor, health_server)


class _ReadinessHealth(health_aio.HealthServicer):  # type: ignore[misc]
    """The standard health service; a Check first lets readiness probe the dependencies
    (rate-limited), so a probe sees an outage even when no call has met it."""

    readiness: Readiness | None = None

    async def Check(self, request: health_pb2.HealthCheckRequest, context: Any) -> Any:
        if self.readiness is not None:
            await self.readiness.on_health_check()
        return await super().Check(request, context)


def run_service(
    name: str, build: Callable[[KitConfig], Awaitable[ServiceApp]], *, port: int | None = None,
    reuse_port: bool = False,
) -> None:
    """A service's `main`: read config, set up logs, traces and /metrics (TALLY_METRICS_PORT),
    serve until SIGTERM/SIGINT.

    The port is the configured `TALLY_<NAME>_PORT` unless `port` is given; `reuse_port` lets
    worker processes of one service share it (start_server).
    """
    try:
        config = load_kit_config()
    except ConfigError as exc:
        exit_on_config_error(exc)
        return
    configure_logging(name, config.log_level)
    setup_telemetry(name)
    if config.metrics_port:
        metrics.serve(config.metrics_port, config.host, name)
        log.info("metrics_serving", service=name, port=config.metrics_port)
    try:
        # uvloop: the same asyncio, with a faster event loop for gRPC and asyncpg.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(_serve_until_signalled(name, config, build, port, reuse_port))
    finally:
        shutdown_telemetry()


async def _serve_until_signalled(
    name: str,
    config: KitConfig,
    build: Callable[[KitConfig], Awaitable[ServiceApp]],
    port: int | None,
    reuse_port: bool = False,
) -> None:
    app = await build(config)
    running = await start_server(
        app,
        host=config.host,
        port=config.port_of(name) if port is None else port,
        grace_seconds=config.shutdown_grace_seconds,
        drain_delay_seconds=config.shutdown_drain_delay_ms / 1000,
        reuse_port=reuse_port,
        health_port=config.health_port,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await running.stop()
