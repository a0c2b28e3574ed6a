"""The HTTP endpoint payment providers post their webhooks to: POST /webhooks/<provider>.

Answers as providers expect: 2xx once the event is processed or known (a replay is
acknowledged and changes nothing), 400 for a forged, stale or malformed one (not retried by
design: it will never become valid), 5xx when processing failed, so the provider retries.
"""

from __future__ import annotations

from typing import Final

from aiohttp import web
from opentelemetry.trace import SpanKind, Status, StatusCode

from services.ledger.payments.service import MAX_WEBHOOK_BYTES, Payments
from tally.kit.errors import Reason, TallyError
from tally.kit.log import get_logger
from tally.kit.telemetry import annotate, tracer

log = get_logger("ledger.webhooks")
_tracer = tracer("tally.ledger.webhooks")

_CLIENT_ERRORS: Final = {
    Reason.WEBHOOK_SIGNATURE_INVALID: 400,
    Reason.INVALID_ARGUMENT: 400,
    Reason.NOT_FOUND: 404,
}


class WebhookEndpoint:
    """An aiohttp server in the ledger's process, in front of Payments.confirm."""

    def __init__(self, payments: Payments, host: str, port: int) -> None:
        self.payments = payments
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_WEBHOOK_BYTES)
        app.router.add_post("/webhooks/{provider}", self.receive)
        return app

    async def start(self) -> None:
        """Binds; `port` is the bound port afterwards (0 lets the OS choose)."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, self.port).start()
        self.port = self._runner.addresses[0][1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def url(self, provider: str) -> str:
        """Where `provider` should post (as reached from this host)."""
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"http://{host}:{self.port}/webhooks/{provider}"

    async def receive(self, request: web.Request) -> web.Response:
        provider = request.match_info["provider"]
        with _tracer.start_as_current_span(f"POST /webhooks/{provider}",
                                           kind=SpanKind.SERVER) as span:
            body = await request.read()
            header = request.headers.get(self.payments.provider.signature_header, "")
            try:
                first, order = await self.payments.confirm(provider, body, header)
            except TallyError as exc:
                status = _CLIENT_ERRORS.get(exc.reason, 503 if exc.reason is Reason.UNAVAILABLE
                                            else 500)
                span.set_status(Status(StatusCode.ERROR, exc.reason.value))
                return web.json_response({"error": exc.reason.value, "message": exc.message},
                                         status=status)
            except Exception:  # the provider retries; the event's row was rolled back
                log.exception("webhook_processing_failed", provider=provider)
                span.set_status(Status(StatusCode.ERROR, "processing failed"))
                return web.json_response({"error": "INTERNAL"}, status=500)
            if order is not None:
                annotate(org_id=order.org_id, payment_order_id=order.payment_order_id,
                         first_time=first)
            return web.json_response({"received": True, "duplicate": not first})
