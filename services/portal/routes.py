"""The portal's pages: each route reads its input, asks `PortalClient`, renders a template.

Every org page is `/orgs/{org_id}/...` and is served only to the org's members; every form
carries the session's CSRF token; every change goes through the client, which checks it with
the services' policy table before sending — a control a role may not use is neither rendered
nor accepted when forged (403 naming the permission).
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, cast

import grpc
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from tally.kit.errors import Reason, TallyError
from tally.kit.log import get_logger
from tally.kit.money import format_money
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.metering.v1 import metering_pb2 as mpb

from . import domain
from .client import KEY_ROLES, ROLES, Caller, PortalClient
from .config import PortalConfig
from .oidc import OidcClient
from .sessions import SessionStore

log = get_logger("tally.portal")

SESSION_COOKIE: Final = "tally_session"
LOGIN_COOKIE: Final = "tally_login"
TRANSACTIONS_PAGE: Final = 25
_STATUS: Final = {Reason.INVALID_ARGUMENT: 400, Reason.PERMISSION_DENIED: 403,
                  Reason.UNAUTHENTICATED: 401, Reason.NOT_FOUND: 404,
                  Reason.WRONG_REGION: 409, Reason.UNAVAILABLE: 503,
                  Reason.IDEMPOTENCY_KEY_REUSED: 409}
_BY_CODE: Final = {grpc.StatusCode.FAILED_PRECONDITION: 409, grpc.StatusCode.ALREADY_EXISTS: 409,
                   grpc.StatusCode.RESOURCE_EXHAUSTED: 429}


def _http_status(reason: Reason) -> int:
    """A refusal's HTTP status: by reason, else by its gRPC code (a seat limit, an org in
    arrears: 409), else 502."""
    from tally.kit.errors import STATUS_OF

    return _STATUS.get(reason) or _BY_CODE.get(STATUS_OF.get(reason, grpc.StatusCode.UNKNOWN),
                                               502)


_ORDER_ID: Final = re.compile(r"^po-portal-[0-9a-f]{32}$")
_MONTH: Final = re.compile(r"^[0-9]{4}-(0[1-9]|1[0-2])$")
_SUBJECT_MAX: Final = 200
_KINDS: Final = {name.removeprefix("TRANSFER_KIND_").lower(): number
                 for name, number in lpb.TransferKind.items() if number}
_GROUPS: Final = {"model": mpb.USAGE_GROUP_BY_MODEL, "project": mpb.USAGE_GROUP_BY_PROJECT,
                  "label": mpb.USAGE_GROUP_BY_LABEL, "meter": mpb.USAGE_GROUP_BY_METER}


@dataclass
class Portal:
    """What every route needs."""

    config: PortalConfig
    client: PortalClient
    sessions: SessionStore
    templates: Jinja2Templates
    oidc: OidcClient | None
    base_url: str

    @property
    def redirect_uri(self) -> str:
        return f"{self.base_url}/auth/callback"


def portal_of(request: Request) -> Portal:
    portal: Portal = request.app.state.portal
    return portal


# --- rendering and errors ----------------------------------------------------------------


def render(request: Request, template: str, status: int = 200, **values: Any) -> Response:
    portal = portal_of(request)
    session: domain.Session | None = getattr(request.state, "session", None)
    org: str | None = request.path_params.get("org_id")
    who = Caller(session.subject, session.access_token) if session else None

    def can(method: str) -> bool:
        return bool(who and org and portal.client.can(who, method, org))

    return portal.templates.TemplateResponse(request, template, {
        "session": session, "org": org, "can": can, "credits": domain.credits,
        "money": format_money, "orgs": portal.client.orgs(who) if who else {},
        "csrf": session.csrf_token if session else "", **values}, status_code=status,
        headers={"Cache-Control": "no-store"})


def error_page(request: Request, status: int, reason: str, message: str) -> Response:
    return render(request, "error.html", status=status, reason=reason, message=message)


def _secure(response: Response, request: Request) -> None:
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers["X-Frame-Options"] = "DENY"
    # no form-action: the buy form is redirected on to the payment provider's checkout
    response.headers["Content-Security-Policy"] = (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'")


Handler = Callable[[Request, domain.Session, Caller], Awaitable[Response]]


def page(handler: Handler, *, org_page: bool = True) -> Callable[[Request], Awaitable[Response]]:
    """Signed-in pages: the session (else sign-in), CSRF on forms, org membership, and any
    refusal or bad input as an error page with the reason."""

    async def endpoint(request: Request) -> Response:
        portal = portal_of(request)
        session = await portal.sessions.get(request.cookies.get(SESSION_COOKIE, ""))
        request.state.session = session
        if session is None:
            if request.method != "GET":
                return error_page(request, 401, "UNAUTHENTICATED", "sign in first")
            target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
            return RedirectResponse(f"/sign-in?next={_quote(target)}", 303)
        try:
            if request.method == "POST":
                form = await request.form()
                request.state.form = form
                if not domain.csrf_ok(session, str(form.get("csrf_token", ""))):
                    return error_page(request, 403, "CSRF", "the form's CSRF token is missing "
                                      "or wrong; reload the page and try again")
            who = await _fresh(portal, session)
            if org_page:
                org = domain.check_org_id(request.path_params["org_id"])
                if org not in portal.client.orgs(who):
                    return error_page(request, 403, "PERMISSION_DENIED",
                                      f"you are not a member of org {org!r}")
            response = await handler(request, session, who)
        except TallyError as exc:
            status = _http_status(exc.reason)
            return error_page(request, status, str(exc.reason), exc.message)
        except grpc.aio.AioRpcError as exc:  # a service down or not answering in Tally's terms
            log.warning("portal_rpc_failed", code=exc.code().name, details=exc.details())
            return error_page(request, 503, "UNAVAILABLE", "a Tally service did not answer "
                              f"({exc.code().name}); try again shortly")
        _secure(response, request)
        return response

    return endpoint


def _quote(text: str) -> str:
    from urllib.parse import quote

    return quote(text, safe="")


async def _fresh(portal: Portal, session: domain.Session) -> Caller:
    """The caller, with the access token refreshed when it is about to expire."""
    import time

    if (portal.oidc is not None and session.refresh_token and session.token_expires_at
            and session.token_expires_at - time.time() < 30):
        tokens = await portal.oidc.refresh(session.refresh_token)
        session.access_token, session.refresh_token = tokens.access_token, tokens.refresh_token
        session.token_expires_at = time.time() + tokens.expires_in_s
        await portal.sessions.save(session)
    return Caller(session.subject, session.access_token)


def _form(request: Request) -> Any:
    return request.state.form


# --- sign-in -------------------------------------------------------------------------------


def _set_cookie(response: Response, portal: Portal, name: str, value: str,
                max_age: int) -> None:
    response.set_cookie(name, value, max_age=max_age, httponly=True, samesite="lax",
                        secure=portal.config.secure_cookies, path="/")


async def sign_in(request: Request) -> Response:
    portal = portal_of(request)
    request.state.session = None
    try:
        target = domain.safe_next(request.query_params.get("next", "/"))
    except TallyError as exc:
        return error_page(request, 400, str(exc.reason), exc.message)
    if portal.oidc is None:
        if not portal.config.dev_sign_in:
            return error_page(request, 503, "UNAVAILABLE", "no identity provider is configured "
                              "(TALLY_PORTAL_OIDC_ISSUER)")
        token = secrets.token_urlsafe(24)
        response = render(request, "dev_sign_in.html", next_path=target, login_token=token)
        _set_cookie(response, portal, LOGIN_COOKIE, token, 600)
        return response
    attempt = await portal.sessions.begin_login(target)
    response = RedirectResponse(await portal.oidc.authorization_url(
        attempt, portal.redirect_uri), 303)
    # binds the attempt to this browser: a callback with someone else's code and state
    # (login CSRF) finds no matching cookie
    _set_cookie(response, portal, LOGIN_COOKIE, attempt.state, 600)
    return response


async def callback(request: Request) -> Response:
    portal = portal_of(request)
    request.state.session = None
    if portal.oidc is None:
        return error_page(request, 404, "NOT_FOUND", "no identity provider is configured")
    state = request.query_params.get("state", "")
    if request.query_params.get("error"):
        return error_page(request, 401, "UNAUTHENTICATED",
                          f"the identity provider said: {request.query_params['error']}")
    if not state or not secrets.compare_digest(state, request.cookies.get(LOGIN_COOKIE, "")):
        return error_page(request, 400, "INVALID_ARGUMENT", "state: does not match the "
                          "sign-in started in this browser; sign in again")
    try:
        attempt = await portal.sessions.take_login(state)
        target = domain.safe_next(attempt.next_path)
        tokens = await portal.oidc.exchange(request.query_params.get("code", ""), attempt,
                                            portal.redirect_uri)
    except TallyError as exc:
        return error_page(request, _http_status(exc.reason), str(exc.reason), exc.message)
    return await _signed_in(request, portal, tokens.subject, target, tokens.access_token,
                            tokens.refresh_token, tokens.expires_in_s)


async def dev_sign_in(request: Request) -> Response:
    portal = portal_of(request)
    request.state.session = None
    if portal.oidc is not None or not portal.config.dev_sign_in:
        return error_page(request, 404, "NOT_FOUND", "development sign-in is off")
    form = await request.form()
    token = str(form.get("login_token", ""))
    if not token or not secrets.compare_digest(token, request.cookies.get(LOGIN_COOKIE, "")):
        return error_page(request, 403, "CSRF", "the sign-in form's token is missing or wrong")
    subject = str(form.get("subject", "")).strip()
    if not subject or len(subject) > 200:
        return error_page(request, 400, "INVALID_ARGUMENT", "subject: required, at most 200 "
                          "characters")
    try:
        target = domain.safe_next(str(form.get("next", "/")))
    except TallyError as exc:
        return error_page(request, 400, str(exc.reason), exc.message)
    log.warning("portal_dev_sign_in", subject=subject)
    return await _signed_in(request, portal, subject, target)


async def _signed_in(request: Request, portal: Portal, subject: str, target: str,
                     access_token: str = "", refresh_token: str = "",
                     expires_in_s: float = 0.0) -> Response:
    # A new session id, whatever cookie the browser arrived with (session fixation).
    old = request.cookies.get(SESSION_COOKIE)
    if old:
        await portal.sessions.drop(old)
    session = await portal.sessions.create(subject, access_token=access_token,
                                     refresh_token=refresh_token, expires_in_s=expires_in_s)
    log.info("portal_signed_in", subject=subject)
    response = RedirectResponse(target, 303)
    _set_cookie(response, portal, SESSION_COOKIE, session.session_id,
                portal.config.session_ttl_s)
    response.delete_cookie(LOGIN_COOKIE, path="/")
    return response


async def sign_out(request: Request, session: domain.Session, who: Caller) -> Response:
    await portal_of(request).sessions.drop(session.session_id)
    response = RedirectResponse("/signed-out", 303)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response


async def signed_out(request: Request) -> Response:
    request.state.session = None
    return render(request, "signed_out.html")


async def home(request: Request, session: domain.Session, who: Caller) -> Response:
    orgs = sorted(portal_of(request).client.orgs(who))
    if len(orgs) == 1:
        return RedirectResponse(f"/orgs/{orgs[0]}/overview", 303)
    return render(request, "home.html", org_list=orgs)


# --- org pages -----------------------------------------------------------------------------


def _today() -> date:
    return datetime.now(UTC).date()


async def overview(request: Request, session: domain.Session, who: Caller) -> Response:
    client, org = portal_of(request).client, request.path_params["org_id"]
    last = _today()
    window = domain.parse_range((last - timedelta(days=domain.BURN_WINDOW_DAYS)).isoformat(),
                                (last - timedelta(days=1)).isoformat(), "day", last)
    balance, spent, rules = await asyncio.gather(
        client.balance(who, org), client.usage_over_time(who, org, window),
        client.alert_rules(who, org), return_exceptions=True)
    for answer in (balance, spent):
        if isinstance(answer, BaseException):
            raise answer
    assert isinstance(balance, lpb.Balance) and isinstance(spent, list)
    burn = domain.burn(sum(m for _, m in spent), balance.available_micros)
    # the balance without the notifier: live updates are then off, the page still shows
    live = not isinstance(rules, BaseException) and _live(rules)
    return render(request, "overview.html", balance=balance, burn=burn,
                  state=_state_name(balance.billing_state), live=live,
                  notifier_down=isinstance(rules, BaseException))


def _live(rules: list[Any]) -> bool:
    """Whether the notifier streams this org's balance changes (an enabled rule for them
    on the stream channel: the notifier notifies only what a rule asks for)."""
    from tally.notifier.v1 import notifier_pb2 as npb

    return any(r.enabled and r.channel == npb.CHANNEL_STREAM
               and npb.NOTIFICATION_TYPE_BALANCE_CHANGED in r.types for r in rules)


async def turn_on_live(request: Request, session: domain.Session, who: Caller) -> Response:
    org = request.path_params["org_id"]
    await portal_of(request).client.turn_on_live_balance(who, org)
    return RedirectResponse(f"/orgs/{org}/overview", 303)


def _state_name(state: int) -> str:
    from tally.common.v1 import common_pb2

    name = common_pb2.BillingState.Name(cast(Any, state)).removeprefix("BILLING_STATE_")
    return "ACTIVE" if name == "UNSPECIFIED" else name.replace("_", " ")


async def balance_events(request: Request, session: domain.Session, who: Caller) -> Response:
    """Server-sent events: the balance now, then again on each balance change the notifier's
    Subscribe stream reports."""
    client, org = portal_of(request).client, request.path_params["org_id"]

    async def snapshot() -> str:
        balance = await client.balance(who, org)
        data = {"available": domain.credits(balance.available_micros),
                "held": domain.credits(balance.held_micros),
                "arrears": domain.credits(balance.arrears_micros),
                "state": _state_name(balance.billing_state)}
        return f"event: balance\ndata: {json.dumps(data)}\n\n"

    async def stream() -> AsyncIterator[str]:
        yield "retry: 2000\n\n"
        yield await snapshot()
        try:
            async for _ in client.balance_changes(who, org):
                yield await snapshot()
        except TallyError as exc:
            yield f"event: error\ndata: {json.dumps(exc.message)}\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def _usage_span(request: Request) -> domain.UsageRange:
    q = request.query_params
    return domain.parse_range(q.get("start", ""), q.get("end", ""), q.get("bucket", "day"),
                              _today())


def _month(request: Request) -> tuple[int, int]:
    raw = request.query_params.get("month", "")
    if not raw:
        today = _today()
        return today.year, today.month
    try:
        year, month = (int(p) for p in raw.split("-"))
        date(year, month, 1)
    except ValueError:
        raise domain.bad_input("month", "must be YYYY-MM") from None
    return year, month


def _dimension(request: Request) -> tuple[str, str]:
    dim = request.query_params.get("by", "model")
    if dim not in _GROUPS:
        raise domain.bad_input("by", f"must be one of {', '.join(domain.DIMENSIONS)}")
    label_key = request.query_params.get("label_key", "team")[:64]
    return dim, label_key


async def _usage_data(request: Request, who: Caller) -> dict[str, Any]:
    client, org = portal_of(request).client, request.path_params["org_id"]
    span, (year, month), (dim, label_key) = _usage_span(request), _month(request), \
        _dimension(request)
    points, summary = await asyncio.gather(
        client.usage_over_time(who, org, span),
        client.usage_summary(who, org, year, month, [_GROUPS[dim]],
                             label_key if dim == "label" else ""))
    key = f"label.{label_key}" if dim == "label" else dim
    groups = domain.by_group(
        (mpb_meter(r.meter) if dim == "meter" else r.key.get(key, ""), r.credits_micros)
         for r in summary.rows)
    return {"span": span, "last_day": (span.end - timedelta(days=1)).date(),
            "over_time": domain.over_time(span, points), "groups": groups,
            "dim": dim, "label_key": label_key, "month": f"{year:04d}-{month:02d}",
            "summary": summary}


def mpb_meter(meter: int) -> str:
    from tally.common.v1 import common_pb2

    return common_pb2.Meter.Name(cast(Any, meter)).removeprefix("METER_").lower()


async def usage(request: Request, session: domain.Session, who: Caller) -> Response:
    data = await _usage_data(request, who)
    return render(request, "usage.html", query=request.url.query, **data,
                  chart_json=json.dumps({"time": data["over_time"].chart(),
                                         "groups": data["groups"].chart()}))


async def usage_csv(request: Request, session: domain.Session, who: Caller) -> Response:
    data = await _usage_data(request, who)
    if request.query_params.get("table") == "groups":
        series, header = data["groups"], [data["dim"], "credits", "credits_micros"]
    else:
        series, header = data["over_time"], [data["span"].bucket, "credits", "credits_micros"]
    body = domain.usage_csv(header, ((label, domain.csv_amount(m), m)
                                     for label, m in series.rows()))
    org = request.path_params["org_id"]
    return Response(body, media_type="text/csv; charset=utf-8", headers={
        "Content-Disposition": f'attachment; filename="usage-{org}.csv"'})


async def transactions(request: Request, session: domain.Session, who: Caller) -> Response:
    client, org, q = portal_of(request).client, request.path_params["org_id"], \
        request.query_params
    event = q.get("event", "").strip()
    if event:  # the "find a request's receipt" form
        return RedirectResponse(f"/orgs/{org}/receipts/{_quote(event[:200])}", 303)
    kind = q.get("kind", "")
    if kind and kind not in _KINDS:
        raise domain.bad_input("kind", f"must be one of {', '.join(sorted(_KINDS))}")
    start = _date_or_none(q.get("start", ""), "start")
    end = _date_or_none(q.get("end", ""), "end")
    if start and end and start > end:
        raise domain.bad_input("start", "must not be after end")
    page_token = q.get("page", "")[:512]
    reply = await client.transactions(who, org, [_KINDS[kind]] if kind else [], start,
                                      end + timedelta(days=1) if end else None, page_token,
                                      TRANSACTIONS_PAGE)
    kinds = {number: name for name, number in _KINDS.items()}
    return render(request, "transactions.html", transfers=reply.transfers,
                  next_page=reply.next_page_token, kinds=kinds, kind=kind,
                  start=q.get("start", ""), end=q.get("end", ""), labelled=domain.labelled)


def _date_or_none(raw: str, field_name: str) -> datetime | None:
    if not raw:
        return None
    try:
        day = date.fromisoformat(raw)
    except ValueError:
        raise domain.bad_input(field_name, "must be a date YYYY-MM-DD") from None
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


async def receipt(request: Request, session: domain.Session, who: Caller) -> Response:
    client, org = portal_of(request).client, request.path_params["org_id"]
    event_id = request.path_params["event_id"]
    if len(event_id) > 200:
        raise domain.bad_input("event_id", "at most 200 characters")
    found = await client.usage_event(who, org, event_id)
    return render(request, "receipt.html", event=found.event, receipt=found.receipt,
                  meter=mpb_meter)


async def budgets(request: Request, session: domain.Session, who: Caller) -> Response:
    client, org = portal_of(request).client, request.path_params["org_id"]
    found_budgets, found_quotas = await asyncio.gather(client.budgets(who, org),
                                                       client.quotas(who, org))
    return render(request, "budgets.html", budgets=found_budgets, quotas=found_quotas,
                  used=domain.headroom_percent,
                  scope_name=lambda n: _enum_name(mpb.BudgetScope, n, "BUDGET_SCOPE_"),
                  enforcement_name=lambda n: _enum_name(mpb.BudgetEnforcement, n,
                                                        "BUDGET_ENFORCEMENT_"),
                  kind_name=lambda n: _enum_name(mpb.QuotaKind, n, "QUOTA_KIND_"),
                  quota_enforcement=lambda n: _enum_name(mpb.QuotaEnforcement, n,
                                                         "QUOTA_ENFORCEMENT_"))


def _enum_name(enum: Any, number: int, prefix: str) -> str:
    return str(enum.Name(number)).removeprefix(prefix).replace("_", " ").lower()


async def alerts(request: Request, session: domain.Session, who: Caller) -> Response:
    from tally.notifier.v1 import notifier_pb2 as npb

    rules = await portal_of(request).client.alert_rules(who, request.path_params["org_id"])
    type_keys = [n.removeprefix("NOTIFICATION_TYPE_").lower()
                 for n in npb.NotificationType.keys() if not n.endswith("UNSPECIFIED")]
    channel_keys = [n.removeprefix("CHANNEL_").lower()
                    for n in npb.Channel.keys() if not n.endswith("UNSPECIFIED")]
    return render(request, "alerts.html", rules=rules, type_name=lambda t: _enum_name(
        npb.NotificationType, t, "NOTIFICATION_TYPE_"), channel_name=lambda c: _enum_name(
        npb.Channel, c, "CHANNEL_"), type_keys=type_keys, channel_keys=channel_keys,
        type_keys_of=lambda r: [str(npb.NotificationType.Name(t)).removeprefix(
            "NOTIFICATION_TYPE_").lower() for t in r.types],
        channel_key=lambda c: str(npb.Channel.Name(c)).removeprefix("CHANNEL_").lower(),
        request_id=uuid.uuid4().hex)


async def invoices(request: Request, session: domain.Session, who: Caller) -> Response:
    found = await portal_of(request).client.invoices(who, request.path_params["org_id"])
    return render(request, "invoices.html", invoices=found)


async def invoice_pdf(request: Request, session: domain.Session, who: Caller) -> Response:
    name, pdf = await portal_of(request).client.invoice_pdf(
        who, request.path_params["org_id"], request.path_params["invoice_id"][:200])
    safe = "".join(c for c in name if c.isalnum() or c in "-_.") or "invoice.pdf"
    return Response(pdf, media_type="application/pdf",
                    headers={"Content-Disposition": f'attachment; filename="{safe}"'})


async def keys(request: Request, session: domain.Session, who: Caller,
               created: Any = None, status: int = 200) -> Response:
    found = await portal_of(request).client.api_keys(who, request.path_params["org_id"])
    from tally.accounts.v1 import accounts_pb2 as apb

    client, org = portal_of(request).client, request.path_params["org_id"]
    grantable = client.key_roles(who, org)
    return render(request, "keys.html", status=status, keys=found, created=created,
                  role_name=lambda r: _enum_name(apb.Role, r, "ROLE_"),
                  key_roles=grantable, request_id=uuid.uuid4().hex,
                  may_manage=lambda r: _enum_name(apb.Role, r, "ROLE_") in grantable)


async def key_create(request: Request, session: domain.Session, who: Caller) -> Response:
    form, org = _form(request), request.path_params["org_id"]
    portal_of(request).client.require(who, "accounts.CreateApiKey", org)
    name = str(form.get("name", "")).strip()
    role = str(form.get("role", ""))
    if not name or len(name) > 100:
        raise domain.bad_input("name", "required, at most 100 characters")
    if role not in KEY_ROLES:
        raise domain.bad_input("role", f"must be one of {', '.join(KEY_ROLES)}")
    created = await portal_of(request).client.create_api_key(
        who, org, str(form.get("request_id", ""))[:64] or uuid.uuid4().hex, name, role)
    return await keys(request, session, who, created=created, status=201)


async def key_rotate(request: Request, session: domain.Session, who: Caller) -> Response:
    form, org = _form(request), request.path_params["org_id"]
    rotated = await portal_of(request).client.rotate_api_key(
        who, org, str(form.get("request_id", ""))[:64] or uuid.uuid4().hex,
        request.path_params["key_id"][:100])
    return await keys(request, session, who, created=rotated, status=201)


async def key_revoke(request: Request, session: domain.Session, who: Caller) -> Response:
    org = request.path_params["org_id"]
    await portal_of(request).client.revoke_api_key(who, org,
                                                   request.path_params["key_id"][:100])
    return RedirectResponse(f"/orgs/{org}/keys", 303)


async def credit(request: Request, session: domain.Session, who: Caller) -> Response:
    client, org = portal_of(request).client, request.path_params["org_id"]
    packages, custom = await asyncio.gather(client.packages(who), client.custom_prices(who))
    orders = (await client.orders(who, org) if client.can(who, "ledger.ListPaymentOrders", org)
              else [])
    config = portal_of(request).config
    return render(request, "credit.html", packages=packages, orders=orders,
                  order_state=_order_state, custom_currencies=sorted(custom),
                  custom_min=config.custom_min_minor, custom_max=config.custom_max_minor,
                  # one id per rendered form: a double submit or a retry is the same order
                  order_id=f"po-portal-{uuid.uuid4().hex}")


def _order_state(state: int) -> str:
    return str(lpb.PaymentOrderState.Name(cast(Any, state))).removeprefix("PAYMENT_ORDER_STATE_")


async def buy(request: Request, session: domain.Session, who: Caller) -> Response:
    """A package or a custom amount, idempotent on the form's order id (rendered with the
    page): submitting twice opens one order, the same checkout."""
    portal, org, form = portal_of(request), request.path_params["org_id"], _form(request)
    portal.client.require(who, "ledger.Purchase", org)
    order_id = str(form.get("order_id", ""))
    if not _ORDER_ID.match(order_id):
        raise domain.bad_input("order_id", "missing or malformed; reload the page")
    back = f"{portal.base_url}/orgs/{org}/orders/{order_id}"
    if form.get("amount") is not None:
        currency = str(form.get("currency", ""))
        amount_minor = domain.parse_amount_minor(str(form.get("amount", "")), currency,
                                                 portal.config.custom_min_minor,
                                                 portal.config.custom_max_minor)
        if currency not in await portal.client.custom_prices(who):
            raise domain.bad_input("currency", f"{currency!r} is not sold as a custom amount")
        order = await portal.client.purchase_custom(who, org, order_id, amount_minor, currency,
                                                    success_url=back, cancel_url=back)
        return RedirectResponse(order.checkout_url or back, 303)
    package_id = str(form.get("package_id", ""))
    if not package_id or len(package_id) > 100:
        raise domain.bad_input("package_id", "choose a package")
    order = await portal.client.purchase(who, org, order_id, package_id, success_url=back,
                                         cancel_url=back)
    return RedirectResponse(order.checkout_url or back, 303)


async def order(request: Request, session: domain.Session, who: Caller) -> Response:
    found = await portal_of(request).client.order(who, request.path_params["org_id"],
                                                  request.path_params["order_id"][:200])
    return render(request, "order.html", order=found, state=_order_state(found.state))


async def top_up(request: Request, session: domain.Session, who: Caller) -> Response:
    client, org = portal_of(request).client, request.path_params["org_id"]
    current, packages = await asyncio.gather(client.auto_top_up(who, org), client.packages(who))
    return render(request, "top_up.html", current=current, packages=packages,
                  saved=request.query_params.get("saved") == "1")


async def top_up_save(request: Request, session: domain.Session, who: Caller) -> Response:
    from tally.kit.money import MoneyError, parse_credits

    org, form = request.path_params["org_id"], _form(request)
    portal_of(request).client.require(who, "ledger.SetAutoTopUp", org)
    try:
        threshold = parse_credits(str(form.get("threshold", "")))
    except MoneyError as exc:
        raise domain.bad_input("threshold", str(exc)) from None
    try:
        max_per_day = int(str(form.get("max_per_day", "1")))
    except ValueError:
        raise domain.bad_input("max_per_day", "must be a whole number") from None
    setting = lpb.AutoTopUp(enabled=form.get("enabled") == "on", threshold_micros=threshold,
                            package_id=str(form.get("package_id", ""))[:100],
                            max_per_day=max_per_day,
                            payment_method_id=str(form.get("payment_method_id", ""))[:200])
    await portal_of(request).client.set_auto_top_up(who, org, setting)
    return RedirectResponse(f"/orgs/{org}/top-up?saved=1", 303)


async def members(request: Request, session: domain.Session, who: Caller) -> Response:
    from tally.accounts.v1 import accounts_pb2 as apb

    client, org = portal_of(request).client, request.path_params["org_id"]
    found, seats = await asyncio.gather(client.members(who, org), client.seats(who, org))
    return render(request, "members.html", members=found, seats=seats,
                  role_name=lambda r: _enum_name(apb.Role, r, "ROLE_"),
                  member_roles=[r for r in ROLES if r != "gateway"],
                  done=request.query_params.get("done", "")[:40])


def _subject(form: Any) -> str:
    subject = str(form.get("subject", "")).strip()
    if not subject or len(subject) > _SUBJECT_MAX:
        raise domain.bad_input("subject", f"required, at most {_SUBJECT_MAX} characters")
    return subject


def _member_role(form: Any) -> str:
    role = str(form.get("role", ""))
    if role not in ROLES or role == "gateway":
        raise domain.bad_input("role", "must be owner, admin, billing, developer or viewer")
    return role


async def member_invite(request: Request, session: domain.Session, who: Caller) -> Response:
    form, org = _form(request), request.path_params["org_id"]
    portal_of(request).client.require(who, "accounts.InviteMember", org)
    await portal_of(request).client.invite_member(who, org, _subject(form), _member_role(form))
    return RedirectResponse(f"/orgs/{org}/members?done=invited", 303)


async def member_role(request: Request, session: domain.Session, who: Caller) -> Response:
    form, org = _form(request), request.path_params["org_id"]
    portal_of(request).client.require(who, "accounts.ChangeMemberRole", org)
    await portal_of(request).client.change_member_role(who, org, _subject(form),
                                                       _member_role(form))
    return RedirectResponse(f"/orgs/{org}/members?done=changed", 303)


async def member_remove(request: Request, session: domain.Session, who: Caller) -> Response:
    form, org = _form(request), request.path_params["org_id"]
    portal_of(request).client.require(who, "accounts.RemoveMember", org)
    await portal_of(request).client.remove_member(who, org, _subject(form))
    return RedirectResponse(f"/orgs/{org}/members?done=removed", 303)


# --- statements ----------------------------------------------------------------------------


def _statement_month(request: Request) -> str:
    month = request.path_params["month"]
    if not _MONTH.match(month):
        raise domain.bad_input("month", "must be YYYY-MM")
    return str(month)


async def statements(request: Request, session: domain.Session, who: Caller) -> Response:
    client, org = portal_of(request).client, request.path_params["org_id"]
    found = await client.statements(who, org)
    months = {s.month for s in found}
    current = _today().strftime("%Y-%m")
    if current not in months:  # the month so far, not stored until it closes
        found.insert(0, await client.statement(who, org, current))
    return render(request, "statements.html", statements=found)


async def statement(request: Request, session: domain.Session, who: Caller) -> Response:
    client, org = portal_of(request).client, request.path_params["org_id"]
    found = await client.statement(who, org, _statement_month(request))
    return render(request, "statement.html", statement=found)


async def statement_pdf(request: Request, session: domain.Session, who: Caller) -> Response:
    name, pdf = await portal_of(request).client.statement_pdf(
        who, request.path_params["org_id"], _statement_month(request))
    safe = "".join(c for c in name if c.isalnum() or c in "-_.") or "statement.pdf"
    return Response(pdf, media_type="application/pdf",
                    headers={"Content-Disposition": f'attachment; filename="{safe}"'})


# --- alert rules ---------------------------------------------------------------------------


def _alert_rule(form: Any) -> Any:
    """An alert rule from the form, checked field by field."""
    from tally.kit.money import MoneyError, parse_credits
    from tally.notifier.v1 import notifier_pb2 as npb

    types = []
    for raw in form.getlist("types"):
        name = f"NOTIFICATION_TYPE_{str(raw).upper()}"
        if name not in npb.NotificationType.keys() or name.endswith("UNSPECIFIED"):
            raise domain.bad_input("types", f"unknown notification type {raw!r}")
        types.append(npb.NotificationType.Value(name))
    if not types:
        raise domain.bad_input("types", "choose at least one")
    channel_name = f"CHANNEL_{str(form.get('channel', '')).upper()}"
    if channel_name not in npb.Channel.keys() or channel_name.endswith("UNSPECIFIED"):
        raise domain.bad_input("channel", "must be webhook, email or stream")
    try:
        cooldown = int(str(form.get("cooldown_seconds", "0") or "0"))
    except ValueError:
        raise domain.bad_input("cooldown_seconds", "must be a whole number") from None
    if not 0 <= cooldown <= 7 * 86400:
        raise domain.bad_input("cooldown_seconds", "must be 0..604800")
    threshold = str(form.get("low_balance_threshold", "")).strip()
    try:
        threshold_micros = parse_credits(threshold) if threshold else 0
    except MoneyError as exc:
        raise domain.bad_input("low_balance_threshold", str(exc)) from None
    return npb.AlertRule(types=types, channel=npb.Channel.Value(channel_name),
                         webhook_url=str(form.get("webhook_url", "")).strip()[:2048],
                         email_to=str(form.get("email_to", "")).strip()[:320],
                         cooldown_seconds=cooldown,
                         low_balance_threshold_micros=threshold_micros,
                         enabled=form.get("enabled") == "on")


def _request_id(form: Any) -> str:
    return str(form.get("request_id", ""))[:64] or uuid.uuid4().hex


async def alert_create(request: Request, session: domain.Session, who: Caller) -> Response:
    form, org = _form(request), request.path_params["org_id"]
    portal_of(request).client.require(who, "notifier.CreateAlertRule", org)
    await portal_of(request).client.create_alert_rule(who, org, _request_id(form),
                                                      _alert_rule(form))
    return RedirectResponse(f"/orgs/{org}/alerts", 303)


async def alert_update(request: Request, session: domain.Session, who: Caller) -> Response:
    form, org = _form(request), request.path_params["org_id"]
    portal_of(request).client.require(who, "notifier.UpdateAlertRule", org)
    rule = _alert_rule(form)
    rule.rule_id = request.path_params["rule_id"][:100]
    await portal_of(request).client.update_alert_rule(who, org, _request_id(form), rule)
    return RedirectResponse(f"/orgs/{org}/alerts", 303)


async def alert_delete(request: Request, session: domain.Session, who: Caller) -> Response:
    form, org = _form(request), request.path_params["org_id"]
    await portal_of(request).client.delete_alert_rule(who, org, _request_id(form),
                                                      request.path_params["rule_id"][:100])
    return RedirectResponse(f"/orgs/{org}/alerts", 303)


async def healthz(request: Request) -> Response:
    """Liveness: the process serves HTTP."""
    return Response("ok\n", media_type="text/plain", headers={"Cache-Control": "no-store"})


async def readyz(request: Request) -> Response:
    """Readiness: the memberships from accounts' credentials feed are loaded (before that every
    page would answer "not a member")."""
    ready = portal_of(request).client.cache.ready.is_set()
    return Response("ready\n" if ready else "waiting for accounts' credentials feed\n",
                    status_code=200 if ready else 503, media_type="text/plain",
                    headers={"Cache-Control": "no-store"})


def routes(static_dir: str) -> list[Route | Mount]:
    org = "/orgs/{org_id}"
    return [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/", page(home, org_page=False)),
        Route("/sign-in", sign_in),
        Route("/auth/callback", callback),
        Route("/dev/sign-in", dev_sign_in, methods=["POST"]),
        Route("/sign-out", page(sign_out, org_page=False), methods=["POST"]),
        Route("/signed-out", signed_out),
        Route(f"{org}/overview", page(overview)),
        Route(f"{org}/events", page(balance_events)),
        Route(f"{org}/live", page(turn_on_live), methods=["POST"]),
        Route(f"{org}/usage", page(usage)),
        Route(f"{org}/usage.csv", page(usage_csv)),
        Route(f"{org}/transactions", page(transactions)),
        Route(f"{org}/receipts/{{event_id}}", page(receipt)),
        Route(f"{org}/budgets", page(budgets)),
        Route(f"{org}/alerts", page(alerts)),
        Route(f"{org}/invoices", page(invoices)),
        Route(f"{org}/invoices/{{invoice_id}}.pdf", page(invoice_pdf)),
        Route(f"{org}/keys", page(keys)),
        Route(f"{org}/keys", page(key_create), methods=["POST"]),
        Route(f"{org}/keys/{{key_id}}/rotate", page(key_rotate), methods=["POST"]),
        Route(f"{org}/keys/{{key_id}}/revoke", page(key_revoke), methods=["POST"]),
        Route(f"{org}/credit", page(credit)),
        Route(f"{org}/credit", page(buy), methods=["POST"]),
        Route(f"{org}/orders/{{order_id}}", page(order)),
        Route(f"{org}/top-up", page(top_up)),
        Route(f"{org}/top-up", page(top_up_save), methods=["POST"]),
        Route(f"{org}/members", page(members)),
        Route(f"{org}/members/invite", page(member_invite), methods=["POST"]),
        Route(f"{org}/members/role", page(member_role), methods=["POST"]),
        Route(f"{org}/members/remove", page(member_remove), methods=["POST"]),
        Route(f"{org}/statements", page(statements)),
        Route(f"{org}/statements/{{month}}.pdf", page(statement_pdf)),
        Route(f"{org}/statements/{{month}}", page(statement)),
        Route(f"{org}/alerts", page(alert_create), methods=["POST"]),
        Route(f"{org}/alerts/{{rule_id}}", page(alert_update), methods=["POST"]),
        Route(f"{org}/alerts/{{rule_id}}/delete", page(alert_delete), methods=["POST"]),
        Mount("/static", StaticFiles(directory=static_dir), name="static"),
    ]
