"""The OpenAI-compatible gateway: what a service in front of AI models builds on Tally.

Per request (`POST /v1/chat/completions`, streamed or not, and `POST /v1/embeddings`):
1. check the body as OpenAI does (400 naming the `param`; nothing is asked or charged);
2. the caller from its API key (callers.py);
3. `Authorize` the worst case (prompt tokens estimated from the text, the request's
   max_completion_tokens / max_tokens or the default); DENY becomes the status an OpenAI client
   expects (402 credits/budgets, 429 + Retry-After quotas, 400 context_length_exceeded;
   tally.kit.http_errors) with OpenAI's error JSON;
4. run the model Authorize chose (the cheaper one on DOWNGRADE) upstream;
5. report what the upstream says was used (input, cached input, output, reasoning tokens)
   against the reservation (usage.py), idempotent on the request id;
6. the receipt in headers: `x-tally-cost` and `x-tally-balance` (micro-credits: 1 credit =
   1,000,000), `x-tally-price-version`, `x-tally-request-id`, `x-tally-model`.
A streamed answer's headers leave before its usage is known: they carry the request id, the
price version and the model, and the receipt follows as the last server-sent event before
`data: [DONE]`, an SSE comment (`: x-tally-receipt {...}`) that SSE clients skip.

The request id is the client's `x-request-id` when it sends one (a retry is then the same
authorization and the same usage event: never charged twice), else a new UUID.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tally.common.v1 import common_pb2
from tally.kit.auth import CredentialCache
from tally.kit.errors import Reason, TallyError
from tally.kit.http_errors import HttpError, http_error, openai_error_body
from tally.kit.log import get_logger
from tally.kit.protoconv import to_timestamp
from tally.metering.v1 import metering_pb2 as mpb
from tally.sdk.client import TallyClient

from . import tokens
from .callers import Caller, caller_of
from .upstream import embedding_inputs
from .usage import UsageReporter

log = get_logger("gateway")

ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MAX_ID: Final = 64
_BAD: Final = http_error(Reason.INVALID_ARGUMENT)


@dataclass(frozen=True, slots=True)
class GatewaySettings:
    """How the gateway calls its upstream and sizes its reservations."""

    upstream_url: str
    upstream_api_key: str = ""
    default_max_output_tokens: int = 1024
    reservation_ttl_s: int = 120
    provider: str = "openai-compatible"


class Phases:
    """Where a request's time went, as a Server-Timing header (milliseconds): `authorize`
    and `usage` are Tally's share, `upstream` the model's."""

    def __init__(self) -> None:
        self._at = time.perf_counter()
        self.spent: dict[str, float] = {}

    def done(self, phase: str) -> None:
        """`phase` ended now (it began when the previous one ended)."""
        now = time.perf_counter()
        self.spent[phase] = (now - self._at) * 1000
        self._at = now

    def header(self) -> dict[str, str]:
        """The Server-Timing header."""
        return {"server-timing": ", ".join(f"{name};dur={ms:.2f}"
                                           for name, ms in self.spent.items())}


class Refused(Exception):
    """A request answered with an error response (OpenAI's JSON)."""

    def __init__(self, error: HttpError, message: str, param: str | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.response = JSONResponse(openai_error_body(message, error, param),
                                     status_code=error.status, headers=dict(headers or {}))


def _bad(message: str, param: str | None) -> Refused:
    return Refused(_BAD, message, param)


@dataclass(frozen=True, slots=True)
class Admitted:
    """A request Authorize let through."""

    caller: Caller
    request_id: str
    answer: mpb.AuthorizeResponse
    operation: int
    user: str

    def headers(self) -> dict[str, str]:
        """What every answer to it carries."""
        return {"x-tally-request-id": self.request_id,
                "x-tally-price-version": str(self.answer.price_book_version),
                "x-tally-model": self.answer.model}


async def _json_object(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise _bad("We could not parse the JSON body of your request.", None) from None
    if not isinstance(body, dict):
        raise _bad("The request body must be a JSON object.", None)
    return body


def _positive_int(body: Mapping[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(f"Invalid '{name}': expected an integer >= 1, got {value!r}.", name)
    return value


def check_chat(body: Mapping[str, Any]) -> None:
    """OpenAI's checks of a chat request that the gateway relies on."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("you must provide a model parameter", "model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("Invalid 'messages': expected a non-empty array of messages.", "messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise _bad(f"Invalid 'messages[{i}].role': expected one of "
                       f"{', '.join(sorted(ROLES))}.", f"messages[{i}].role")
        content = message.get("content")
        if content is not None and not isinstance(content, str | list):
            raise _bad(f"Invalid 'messages[{i}].content': expected a string or an array.",
                       f"messages[{i}].content")
    _positive_int(body, "max_tokens")
    _positive_int(body, "max_completion_tokens")
    if body.get("n", 1) != 1:
        raise _bad("Invalid 'n': this gateway returns one choice (n=1).", "n")
    if not isinstance(body.get("stream", False), bool):
        raise _bad("Invalid 'stream': expected a boolean.", "stream")


def check_embeddings(body: Mapping[str, Any]) -> list[str]:
    """OpenAI's checks of an embeddings request; its inputs as texts."""
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("you must provide a model parameter", "model")
    texts = embedding_inputs(body.get("input"))
    if texts is None or not all(texts):
        raise _bad("Invalid 'input': expected a non-empty string or array of strings "
                   "or token arrays.", "input")
    _positive_int(body, "dimensions")
    if body.get("encoding_format", "float") not in ("float", "base64"):
        raise _bad("Invalid 'encoding_format': expected 'float' or 'base64'.",
                   "encoding_format")
    return texts


def _refusal(answer: mpb.AuthorizeResponse, request_id: str) -> Refused:
    error = http_error(answer.deny_reason)
    headers = {"x-tally-request-id": request_id, "x-tally-reason": answer.deny_reason,
               "x-tally-price-version": str(answer.price_book_version)}
    if answer.retry_after_ms:
        headers["retry-after"] = str(max(1, -(-answer.retry_after_ms // 1000)))
    return Refused(error, answer.message or answer.deny_reason, None, headers)


def _tally_failure(exc: TallyError, request_id: str) -> Refused:
    param = exc.violations[0].field if exc.violations else None
    return Refused(http_error(exc.reason.value), exc.message, param,
                   {"x-tally-request-id": request_id, "x-tally-reason": exc.reason.value})


def chat_quantities(usage: Mapping[str, Any]) -> list[common_pb2.MeterQuantity]:
    """OpenAI's usage as Tally's meters (cached input and reasoning split out)."""
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    reasoning = int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
    found = [common_pb2.MeterQuantity(meter=common_pb2.METER_INPUT_TOKENS,
                                      quantity=prompt - cached),
             common_pb2.MeterQuantity(meter=common_pb2.METER_OUTPUT_TOKENS,
                                      quantity=completion - reasoning)]
    if cached:
        found.append(common_pb2.MeterQuantity(meter=common_pb2.METER_CACHED_INPUT_TOKENS,
                                              quantity=cached))
    if reasoning:
        found.append(common_pb2.MeterQuantity(meter=common_pb2.METER_REASONING_TOKENS,
                                              quantity=reasoning))
    return found


class Gateway:
    """The proxy's behaviour; `build_app` puts it on routes."""

    def __init__(self, tally: TallyClient, credentials: CredentialCache,
                 reporter: UsageReporter, upstream: httpx.AsyncClient,
                 settings: GatewaySettings) -> None:
        self.tally = tally
        self.credentials = credentials
        self.reporter = reporter
        self.upstream = upstream
        self.settings = settings
        self._late: set[asyncio.Task[Any]] = set()

    async def _admit(self, request: Request, body: Mapping[str, Any], operation: int,
                     input_tokens: int, max_output: int) -> Admitted:
        request_id = request.headers.get("x-request-id") or str(uuid.uuid4())
        if len(request_id) > MAX_ID:
            raise _bad(f"x-request-id: at most {MAX_ID} characters", "x-request-id")
        try:
            caller = caller_of(self.credentials, request.headers)
        except TallyError as exc:
            raise _tally_failure(exc, request_id) from None
        named = body.get("user")
        user = named if isinstance(named, str) else ""
        try:
            answer = await self.tally.metering.Authorize(mpb.AuthorizeRequest(
                request_id=request_id, context=self._context(caller, user),
                model=body["model"], operation=operation,  # type: ignore[arg-type]
                estimated_input_tokens=input_tokens, max_output_tokens=max_output,
                context_tokens=input_tokens,
                reservation_ttl_seconds=self.settings.reservation_ttl_s))
        except TallyError as exc:  # UNKNOWN_MODEL, bad fields, UNAVAILABLE
            raise _tally_failure(exc, request_id) from None
        if answer.decision == mpb.DECISION_DENY:
            raise _refusal(answer, request_id)
        return Admitted(caller, request_id, answer, operation, user)

    @staticmethod
    def _context(caller: Caller, user: str) -> common_pb2.RequestContext:
        return common_pb2.RequestContext(
            org_id=caller.org_id, project_id=caller.project_id,
            environment=caller.environment, api_key_id=caller.api_key_id,
            user_id=user[:MAX_ID], labels=dict(caller.labels))

    async def _report(self, admitted: Admitted, quantities: list[common_pb2.MeterQuantity],
                      upstream_id: str) -> dict[str, str]:
        """Reports usage against the reservation; the receipt's headers."""
        answer = admitted.answer
        # when it was authorized (a retry of the request id reports the same event)
        occurred = (answer.reservation_expires_at.ToDatetime(tzinfo=UTC)
                    - timedelta(seconds=self.settings.reservation_ttl_s)
                    if answer.HasField("reservation_expires_at") else datetime.now(UTC))
        event = mpb.UsageEvent(
            event_id=admitted.request_id, occurred_at=to_timestamp(occurred),
            context=self._context(admitted.caller, admitted.user),
            provider=self.settings.provider, model=admitted.answer.model,
            operation=admitted.operation,  # type: ignore[arg-type]
            quantities=quantities, reservation_id=admitted.answer.reservation_id,
            evidence=mpb.RequestEvidence(request_id=admitted.request_id,
                                         upstream_request_id=upstream_id[:MAX_ID]))
        try:
            result = await self.reporter.report(event)
        except TallyError as exc:
            log.error("usage_not_recorded", request_id=admitted.request_id,
                      reason=exc.reason.value, error=exc.message)
            return {"x-tally-usage": f"not recorded: {exc.reason.value}"}
        if result.status == mpb.EVENT_STATUS_REJECTED:
            log.error("usage_rejected", request_id=admitted.request_id, reason=result.reason,
                      error=result.message)
            return {"x-tally-usage": f"rejected: {result.reason}"}
        receipt = result.receipt
        return {"x-tally-cost": str(receipt.cost_micros),
                "x-tally-balance": str(receipt.balance_after_micros),
                "x-tally-price-version": str(receipt.price_book_version)}

    async def _release(self, admitted: Admitted) -> None:
        """The upstream served nothing: usage of nothing closes the reservation now."""
        await self._report(admitted, [common_pb2.MeterQuantity(
            meter=common_pb2.METER_INPUT_TOKENS, quantity=0)], "")

    def _upstream_headers(self) -> dict[str, str]:
        key = self.settings.upstream_api_key
        return {"authorization": f"Bearer {key}"} if key else {}

    async def _upstream_answer(self, admitted: Admitted, path: str, body: dict[str, Any]
                               ) -> httpx.Response | Response:
        """The upstream's successful reply, or (its hold released) the upstream's own error
        passed through; an unreachable upstream is UNAVAILABLE. Nothing is charged unless
        the model answered."""
        try:
            reply = await self.upstream.post(path, json=body, headers=self._upstream_headers())
        except httpx.HTTPError as exc:
            await self._release(admitted)
            raise Refused(http_error("UNAVAILABLE"), f"upstream: {exc}") from None
        if reply.status_code != 200:
            await self._release(admitted)
            return Response(reply.content, status_code=reply.status_code,
                            media_type="application/json", headers=admitted.headers())
        return reply

    async def chat(self, request: Request) -> Response:
        """POST /v1/chat/completions."""
        body = await _json_object(request)
        check_chat(body)
        max_output = (body.get("max_completion_tokens") or body.get("max_tokens")
                      or self.settings.default_max_output_tokens)
        phases = Phases()
        admitted = await self._admit(request, body, mpb.OPERATION_CHAT,
                                     tokens.prompt_tokens(body["messages"]), max_output)
        phases.done("authorize")
        upstream_body = {**body, "model": admitted.answer.model}
        if body.get("stream"):
            return await self._chat_stream(admitted, upstream_body)
        reply = await self._upstream_answer(admitted, "/v1/chat/completions", upstream_body)
        if isinstance(reply, Response):
            return reply
        phases.done("upstream")
        completion = reply.json()
        receipt = await self._report(admitted, chat_quantities(completion.get("usage") or {}),
                                     str(completion.get("id", "")))
        phases.done("usage")
        return Response(reply.content, media_type="application/json",
                        headers={**admitted.headers(), **receipt, **phases.header()})

    async def _chat_stream(self, admitted: Admitted, body: dict[str, Any]) -> Response:
        # the upstream always reports usage (what is charged); the client sees that chunk
        # only when it asked for it, so its stream is what the upstream would have sent it
        client_wants_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        sent = self.upstream.build_request("POST", "/v1/chat/completions", json=body,
                                           headers=self._upstream_headers())
        try:
            reply = await self.upstream.send(sent, stream=True)
        except httpx.HTTPError as exc:
            await self._release(admitted)
            raise Refused(http_error("UNAVAILABLE"), f"upstream: {exc}") from None
        if reply.status_code != 200:
            content = await reply.aread()
            await reply.aclose()
            await self._release(admitted)
            return Response(content, status_code=reply.status_code,
                            media_type="application/json", headers=admitted.headers())
        return StreamingResponse(self._relay(admitted, reply, client_wants_usage),
                                 media_type="text/event-stream",
                                 headers={**admitted.headers(), "cache-control": "no-cache"})

    async def _relay(self, admitted: Admitted, reply: httpx.Response,
                     client_wants_usage: bool) -> AsyncIterator[bytes]:
        usage: dict[str, Any] | None = None
        completion, upstream_id = 0, ""
        reported = False
        try:
            async for line in reply.aiter_lines():
                if not line.startswith("data:"):
                    if line.startswith(":"):
                        yield f"{line}\n\n".encode()
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    receipt = await self._report(admitted, chat_quantities(usage or {
                        "completion_tokens": completion}), upstream_id)
                    reported = True
                    yield f": x-tally-receipt {json.dumps(receipt)}\n\n".encode()
                    yield b"data: [DONE]\n\n"
                    continue
                chunk = json.loads(data)
                upstream_id = str(chunk.get("id", upstream_id))
                if chunk.get("usage") and not chunk.get("choices"):
                    usage = chunk["usage"]
                    if not client_wants_usage:
                        continue
                for choice in chunk.get("choices") or ():
                    completion += tokens.count(
                        str((choice.get("delta") or {}).get("content") or ""))
                yield f"data: {data}\n\n".encode()
        finally:
            await reply.aclose()
            if not reported:  # the client left (or the upstream broke) mid-stream
                task = asyncio.create_task(self._report(admitted, chat_quantities(usage or {
                    "completion_tokens": completion}), upstream_id))
                self._late.add(task)
                task.add_done_callback(self._late.discard)

    async def embeddings(self, request: Request) -> Response:
        """POST /v1/embeddings."""
        body = await _json_object(request)
        texts = check_embeddings(body)
        phases = Phases()
        admitted = await self._admit(request, body, mpb.OPERATION_EMBEDDING_WRITE,
                                     sum(tokens.count(t) for t in texts), 0)
        phases.done("authorize")
        reply = await self._upstream_answer(admitted, "/v1/embeddings",
                                            {**body, "model": admitted.answer.model})
        if isinstance(reply, Response):
            return reply
        phases.done("upstream")
        used = int((reply.json().get("usage") or {}).get("prompt_tokens") or 0)
        receipt = await self._report(admitted, [common_pb2.MeterQuantity(
            meter=common_pb2.METER_INPUT_TOKENS, quantity=used)], "")
        phases.done("usage")
        return Response(reply.content, media_type="application/json",
                        headers={**admitted.headers(), **receipt, **phases.header()})


def build_app(gateway: Gateway) -> Starlette:
    """The gateway's routes; refusals become OpenAI's error JSON."""

    async def refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Refused)
        return exc.response

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse(openai_error_body(
            f"Unknown request URL: {request.method} {request.url.path}.",
            HttpError(404, "invalid_request_error", "unknown_url")), status_code=404)

    return Starlette(
        routes=[Route("/v1/chat/completions", gateway.chat, methods=["POST"]),
                Route("/v1/embeddings", gateway.embeddings, methods=["POST"])],
        exception_handlers={Refused: refused, 404: not_found, 405: not_found})
