"""The portal over plain HTTP (no browser): sign-in through the OIDC provider with PKCE,
session and CSRF rules, pages with real data, the policy table on every action, bad input."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import httpx

from services.portal.routes import LOGIN_COOKIE, SESSION_COOKIE
from tally.accounts.v1 import accounts_pb2 as apb
from tally.ledger.v1 import ledger_pb2 as lpb
from tally.metering.v1 import metering_pb2 as mpb
from tests.ledger.payments_support import EXPIRY, GOOD_CARD
from tests.portal.support import MODEL, ORG, OTHER_ORG, PEOPLE, Suite, csrf_of, field_of, signed_in


async def test_sign_in_with_pkce_lands_on_the_overview_with_the_real_balance(
        suite: Suite) -> None:
    async with signed_in(suite, PEOPLE["viewer"]) as http:
        home = await http.get("/")
        assert home.status_code == 303 and home.headers["location"] == f"/orgs/{ORG}/overview"
        page = await http.get(f"/orgs/{ORG}/overview")
        assert page.status_code == 200, page.text
        balance = await suite.balance()
        assert f'id="available">{balance.available_micros // 1_000_000}' in page.text
        assert "vera" in page.text and "viewer" in page.text


async def page_of(http: httpx.AsyncClient, path: str) -> str:
    reply = await http.get(path)
    assert reply.status_code == 200, (path, reply.status_code, reply.text[-600:])
    return reply.text


async def test_every_read_page_renders_real_data_for_the_owner(suite: Suite) -> None:
    base = f"/orgs/{ORG}"
    async with signed_in(suite, PEOPLE["owner"]) as http:
        usage = await page_of(http, f"{base}/usage?by=model")
        assert MODEL in usage and 'id="table-time"' in usage and 'id="chart-groups"' in usage
        by_label = await page_of(http, f"{base}/usage?by=label&label_key=team")
        assert "alpha" in by_label and "beta" in by_label
        by_project = await page_of(http, f"{base}/usage?by=project")
        assert "search" in by_project and "chat" in by_project
        hourly = await page_of(http, f"{base}/usage?bucket=hour")
        assert ":00</th>" in hourly
        transactions = await page_of(http, f"{base}/transactions?kind=promotional_grant")
        assert "welcome credit" in transactions and "grant-portal-org" in transactions
        found = await http.get(f"{base}/transactions?event=portal-evt-0")
        assert found.headers["location"] == f"{base}/receipts/portal-evt-0"
        receipt = await page_of(http, f"{base}/receipts/portal-evt-0")
        assert "input_tokens" in receipt and "Price book version" in receipt
        budgets = await page_of(http, f"{base}/budgets")
        assert "Monthly cap" in budgets and "<meter" in budgets and "requests per second" in budgets
        alerts = await page_of(http, f"{base}/alerts")
        assert "balance changed" in alerts and "stream" in alerts
        invoices = await page_of(http, f"{base}/invoices")
        assert "Invoices and credit notes" in invoices
        credit = await page_of(http, f"{base}/credit")
        assert "individual-20" in credit and 'name="package_id"' in credit
        members = await page_of(http, f"{base}/members")
        assert all(p in members for p in PEOPLE.values()) and "paid seats used" in members
        keys = await page_of(http, f"{base}/keys")
        assert 'id="create-key"' in keys
        top_up = await page_of(http, f"{base}/top-up")
        assert 'id="top-up-form"' in top_up


async def test_usage_csv_is_rfc4180_and_equals_the_roll_ups(suite: Suite) -> None:
    async with signed_in(suite, PEOPLE["viewer"]) as http:
        reply = await http.get(f"/orgs/{ORG}/usage.csv?by=model&table=groups")
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/csv")
        lines = reply.text.split("\r\n")
        assert lines[0] == "model,credits,credits_micros"
        rows = [line.split(",") for line in lines[1:] if line]
        summary = await suite.tally.metering.GetUsageSummary(mpb.GetUsageSummaryRequest(
            org_id=ORG, year=datetime.now(UTC).year, month=datetime.now(UTC).month))
        assert sum(int(r[2]) for r in rows) == summary.total_credits_micros > 0


async def test_a_viewer_sees_no_mutating_control_and_every_forged_form_is_refused_403(
        suite: Suite) -> None:
    base = f"/orgs/{ORG}"
    async with signed_in(suite, PEOPLE["owner"]) as owner:
        created = await owner.post(f"{base}/keys", data={
            "csrf_token": csrf_of(await page_of(owner, f"{base}/keys")), "name": "ci",
            "role": "gateway", "request_id": "portal-viewer-test"})
        assert created.status_code == 201, created.text
    keys_before = await _keys(suite)
    orders_before = await _orders(suite)
    async with signed_in(suite, PEOPLE["viewer"]) as viewer:
        overview = await page_of(viewer, f"{base}/overview")
        credit = await page_of(viewer, f"{base}/credit")
        for page in (overview, credit):
            assert "Buy<" not in page and 'name="package_id"' not in page
        assert f"{base}/keys" not in overview and f"{base}/top-up" not in overview
        token = csrf_of(overview)  # the sign-out form's: a valid token of this session
        key_id = keys_before[0].key_id
        forged = {
            f"{base}/keys": {"name": "mine", "role": "admin"},
            f"{base}/keys/{key_id}/rotate": {},
            f"{base}/keys/{key_id}/revoke": {},
            f"{base}/credit": {"package_id": "individual-20"},
            f"{base}/top-up": {"enabled": "on", "threshold": "10", "package_id": "individual-20",
                               "max_per_day": "1", "payment_method_id": "pm_card_visa"},
        }
        for path, fields in forged.items():
            reply = await viewer.post(path, data={"csrf_token": token, **fields})
            assert reply.status_code == 403, (path, reply.status_code)
            assert "PERMISSION_DENIED" in reply.text and "needs one of" in reply.text, path
        for path in (f"{base}/keys", f"{base}/members", f"{base}/top-up", f"{base}/invoices"):
            assert (await viewer.get(path)).status_code == 403, path
    assert await _keys(suite) == keys_before
    assert await _orders(suite) == orders_before
    top_up = await suite.tally.ledger.GetAutoTopUp(lpb.GetAutoTopUpRequest(org_id=ORG))
    assert not top_up.auto_top_up.enabled


async def _keys(suite: Suite) -> list[apb.ApiKey]:
    return list((await suite.tally.accounts.ListApiKeys(apb.ListApiKeysRequest(
        org_id=ORG))).keys)


async def _orders(suite: Suite) -> list[lpb.PaymentOrder]:
    return list((await suite.tally.ledger.ListPaymentOrders(lpb.ListPaymentOrdersRequest(
        org_id=ORG))).orders)


async def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(
        suite: Suite) -> None:
    before = await _keys(suite)
    async with signed_in(suite, PEOPLE["owner"]) as owner:
        for token in ("", "not-the-token"):
            reply = await owner.post(f"/orgs/{ORG}/keys", data={
                "csrf_token": token, "name": "csrf", "role": "gateway"})
            assert reply.status_code == 403 and "CSRF" in reply.text
    assert await _keys(suite) == before


async def test_a_session_id_planted_before_sign_in_is_never_signed_in(suite: Suite) -> None:
    planted = "attacker-chosen-session-id"
    http = httpx.AsyncClient(base_url=suite.url, cookies={SESSION_COOKIE: planted})
    async with http:
        signed = await _sign_in(suite, http, PEOPLE["owner"])
        issued = signed.cookies.get(SESSION_COOKIE)
        assert issued and issued != planted
    async with httpx.AsyncClient(base_url=suite.url,
                                 cookies={SESSION_COOKIE: planted}) as attacker:
        reply = await attacker.get(f"/orgs/{ORG}/overview")
        assert reply.status_code == 303 and reply.headers["location"].startswith("/sign-in")


async def _sign_in(suite: Suite, http: httpx.AsyncClient, subject: str) -> httpx.Response:
    to_provider = await http.get("/sign-in?next=/")
    form = dict(httpx.URL(to_provider.headers["location"]).params, username=subject)
    async with httpx.AsyncClient() as provider_http:
        approved = await provider_http.post(f"{suite.oidc.issuer}/authorize", data=form)
    back = httpx.URL(approved.headers["location"])
    done = await http.get(f"/auth/callback?{back.query.decode()}")
    assert done.status_code == 303
    return done


async def test_sign_in_cookies_are_httponly_and_samesite_lax(suite: Suite) -> None:
    async with httpx.AsyncClient(base_url=suite.url) as http:
        to_provider = await http.get("/sign-in?next=/")
        cookie = to_provider.headers["set-cookie"].lower()
        assert "httponly" in cookie and "samesite=lax" in cookie


async def test_open_redirects_and_forged_callbacks_are_refused(suite: Suite) -> None:
    async with httpx.AsyncClient(base_url=suite.url) as http:
        for target in ("https://evil.example/", "//evil.example", "/\\evil.example",
                       "javascript:alert(1)"):
            reply = await http.get("/sign-in", params={"next": target})
            assert reply.status_code == 400 and "open redirect" in reply.text, target
        # a callback this browser did not start (login CSRF), and a made-up state
        reply = await http.get("/auth/callback?code=x&state=y")
        assert reply.status_code == 400 and "state" in reply.text
    async with httpx.AsyncClient(base_url=suite.url) as http:
        to_provider = await http.get("/sign-in?next=/")
        form = dict(httpx.URL(to_provider.headers["location"]).params, username="olivia")
        async with httpx.AsyncClient() as provider_http:
            approved = await provider_http.post(f"{suite.oidc.issuer}/authorize", data=form)
        query = httpx.URL(approved.headers["location"]).query.decode()
        assert (await http.get(f"/auth/callback?{query}")).status_code == 303
        http.cookies.set(LOGIN_COOKIE, dict(httpx.URL(f"/?{query}").params)["state"])
        replay = await http.get(f"/auth/callback?{query}")  # the same code and state again
        assert replay.status_code == 400


async def test_sign_out_ends_the_session(suite: Suite) -> None:
    async with signed_in(suite, PEOPLE["viewer"]) as http:
        token = csrf_of(await page_of(http, f"/orgs/{ORG}/overview"))
        session = http.cookies.get(SESSION_COOKIE)
        out = await http.post("/sign-out", data={"csrf_token": token})
        assert out.status_code == 303 and out.headers["location"] == "/signed-out"
        http.cookies.set(SESSION_COOKIE, session or "")
        again = await http.get(f"/orgs/{ORG}/overview")
        assert again.status_code == 303 and again.headers["location"].startswith("/sign-in")


async def test_other_orgs_ids_in_urls_are_refused_with_the_reason(suite: Suite) -> None:
    async with signed_in(suite, PEOPLE["owner"]) as http:
        for path in (f"/orgs/{OTHER_ORG}/overview", f"/orgs/{OTHER_ORG}/transactions",
                     f"/orgs/{OTHER_ORG}/receipts/portal-evt-0"):
            reply = await http.get(path)
            assert reply.status_code == 403 and "not a member of org" in reply.text, path
            assert "77" not in reply.text
        token = csrf_of(await page_of(http, f"/orgs/{ORG}/overview"))
        reply = await http.post(f"/orgs/{OTHER_ORG}/credit",
                                data={"csrf_token": token, "package_id": "individual-20"})
        assert reply.status_code == 403
        bad = await http.get("/orgs/..%2F..%2Fetc/overview")
        assert bad.status_code in (400, 404)
    other = await suite.tally.ledger.ListPaymentOrders(lpb.ListPaymentOrdersRequest(
        org_id=OTHER_ORG))
    assert not other.orders


async def test_bad_and_oversized_query_ranges_get_an_error_page_naming_the_field(
        suite: Suite) -> None:
    base = f"/orgs/{ORG}"
    cases = {
        f"{base}/usage?bucket=hour&start=2026-01-01&end=2026-03-01": "end: the range is 60 days",
        f"{base}/usage?bucket=day&start=2020-01-01&end=2026-01-01": "at most 92 days",
        f"{base}/usage?start=yesterday": "start: must be a date",
        f"{base}/usage?bucket=minute": "bucket: must be day or hour",
        f"{base}/usage?by=colour": "by: must be one of",
        f"{base}/usage?month=2026-13": "month: must be YYYY-MM",
        f"{base}/transactions?kind=free-money": "kind: must be one of",
        f"{base}/transactions?start=2026-02-01&end=2026-01-01": "start: must not be after end",
    }
    async with signed_in(suite, PEOPLE["viewer"]) as http:
        for path, reason in cases.items():
            reply = await http.get(path)
            assert reply.status_code == 400, (path, reply.status_code)
            assert reason in reply.text, (path, reply.text[-400:])
        missing = await http.get(f"{base}/receipts/no-such-event")
        assert missing.status_code == 404


async def test_a_billing_member_saves_auto_top_up_and_a_developer_cannot(suite: Suite) -> None:
    form = {"enabled": "on", "threshold": "50", "package_id": "individual-20",
            "max_per_day": "2", "payment_method_id": "pm_card_visa"}
    async with signed_in(suite, PEOPLE["developer"]) as http:
        token = csrf_of(await page_of(http, f"/orgs/{ORG}/overview"))
        refused = await http.post(f"/orgs/{ORG}/top-up", data={"csrf_token": token, **form})
        assert refused.status_code == 403
        assert MODEL in await page_of(http, f"/orgs/{ORG}/usage")
    async with signed_in(suite, PEOPLE["billing"]) as http:
        token = csrf_of(await page_of(http, f"/orgs/{ORG}/top-up"))
        bad = await http.post(f"/orgs/{ORG}/top-up", data={"csrf_token": token, **form,
                                                           "threshold": "lots"})
        assert bad.status_code == 400 and "threshold" in bad.text
        saved = await http.post(f"/orgs/{ORG}/top-up", data={"csrf_token": token, **form})
        assert saved.status_code == 303, saved.text
        page = await page_of(http, f"/orgs/{ORG}/top-up?saved=1")
        assert "On: below 50 credits" in page
    setting = await suite.tally.ledger.GetAutoTopUp(lpb.GetAutoTopUpRequest(org_id=ORG))
    assert setting.auto_top_up.threshold_micros == 50_000_000
    await suite.tally.ledger.SetAutoTopUp(lpb.SetAutoTopUpRequest(
        request_id="portal-top-up-off", auto_top_up=lpb.AutoTopUp(
            org_id=ORG, enabled=False, threshold_micros=0, package_id="individual-20")))


async def test_an_owner_creates_a_key_shown_once_then_rotates_and_revokes_it(
        suite: Suite) -> None:
    base = f"/orgs/{ORG}"
    async with signed_in(suite, PEOPLE["owner"]) as http:
        token = csrf_of(await page_of(http, f"{base}/keys"))
        created = await http.post(f"{base}/keys", data={
            "csrf_token": token, "name": "deploy", "role": "gateway",
            "request_id": "portal-key-flow"})
        assert created.status_code == 201
        secret = created.text.split('id="new-secret">')[1].split("<")[0]
        assert secret.startswith("tly_")
        listing = await page_of(http, f"{base}/keys")
        assert secret not in listing and "deploy" in listing
        key = next(k for k in await _keys(suite) if k.name == "deploy")
        rotated = await http.post(f"{base}/keys/{key.key_id}/rotate",
                                  data={"csrf_token": token, "request_id": "portal-rot"})
        assert rotated.status_code == 201
        new_secret = rotated.text.split('id="new-secret">')[1].split("<")[0]
        assert new_secret.startswith("tly_") and new_secret != secret
        revoked = await http.post(f"{base}/keys/{key.key_id}/revoke",
                                  data={"csrf_token": token})
        assert revoked.status_code == 303
    after = {k.key_id: k for k in await _keys(suite)}
    assert after[key.key_id].HasField("revoke_time")


async def test_live_balance_is_offered_where_no_rule_streams_it_and_a_viewer_cannot_add_it(
        suite: Suite) -> None:
    async with signed_in(suite, "mallory") as owner:
        page = await page_of(owner, f"/orgs/{OTHER_ORG}/overview")
        assert 'id="live-off"' in page and 'id="turn-on-live"' in page
        assert "data-events" not in page
        done = await owner.post(f"/orgs/{OTHER_ORG}/live", data={"csrf_token": csrf_of(page)})
        assert done.status_code == 303
        page = await page_of(owner, f"/orgs/{OTHER_ORG}/overview")
        assert 'id="live-state"' in page and 'id="live-off"' not in page
    async with signed_in(suite, PEOPLE["viewer"]) as viewer:
        page = await page_of(viewer, f"/orgs/{ORG}/overview")
        assert 'id="turn-on-live"' not in page
        forged = await viewer.post(f"/orgs/{ORG}/live", data={"csrf_token": csrf_of(page)})
        assert forged.status_code == 403


async def test_an_expiring_access_token_is_refreshed_with_the_refresh_token(
        suite: Suite) -> None:
    suite.oidc.token_ttl_s = 10  # below the portal's 30 s margin: every page refreshes
    try:
        async with signed_in(suite, PEOPLE["viewer"]) as http:
            sessions = suite.portal.server.config.app.state.portal.sessions
            session = await sessions.get(http.cookies[SESSION_COOKIE])
            first = (session.access_token, session.refresh_token)
            await page_of(http, f"/orgs/{ORG}/overview")
            session = await sessions.get(http.cookies[SESSION_COOKIE])
            assert (session.access_token, session.refresh_token) != first
            assert session.subject == PEOPLE["viewer"]
    finally:
        suite.oidc.token_ttl_s = 300


async def test_buying_on_the_portal_returns_to_the_order_and_its_invoice_downloads(
        suite: Suite) -> None:
    base = f"/orgs/{ORG}"
    async with signed_in(suite, PEOPLE["billing"]) as http:
        credit = await page_of(http, f"{base}/credit")
        form = {"csrf_token": csrf_of(credit), "package_id": "individual-20",
                "order_id": field_of(credit, "order_id")}
        started = await http.post(f"{base}/credit", data=form)
        assert started.status_code == 303
        checkout = started.headers["location"]
        again = await http.post(f"{base}/credit", data=form)  # a double click: one order
        assert again.status_code == 303 and again.headers["location"] == checkout
        assert "/checkout/" in checkout
        async with httpx.AsyncClient() as customer:
            paid = await customer.post(f"{checkout}/pay", data={
                "card_number": GOOD_CARD, "expiry": EXPIRY, "cvc": "123", "name": "Bill"})
        assert paid.status_code == 303
        returned = httpx.URL(paid.headers["location"])
        assert returned.path.startswith(f"{base}/orders/po-portal-")
        await suite.provider.settled()
        order_page = await page_of(http, returned.path)
        assert 'id="order-state">SUCCEEDED' in order_page
        invoices = await page_of(http, f"{base}/invoices")
        number = invoices.split('<th scope="row">INV-')[1].split("<")[0]
        pdf = await http.get(f"{base}/invoices/INV-{number}.pdf")
        assert pdf.status_code == 200 and pdf.content.startswith(b"%PDF")
        assert pdf.headers["content-type"] == "application/pdf"
        missing = await http.get(f"{base}/invoices/INV-1999-000001.pdf")
        assert missing.status_code == 404
    async with signed_in(suite, PEOPLE["viewer"]) as viewer:
        refused = await viewer.get(f"{base}/invoices/INV-{number}.pdf")
        assert refused.status_code == 403 and b"%PDF" not in refused.content


def _oid() -> str:
    return f"po-portal-{uuid.uuid4().hex}"


async def test_forged_form_fields_get_an_error_page_naming_the_field_and_change_nothing(
        suite: Suite) -> None:
    base = f"/orgs/{ORG}"
    keys_before, orders_before = await _keys(suite), await _orders(suite)
    async with signed_in(suite, PEOPLE["owner"]) as http:
        token = csrf_of(await page_of(http, f"{base}/keys"))
        cases = [
            (f"{base}/keys", {"name": "x", "role": "owner"}, "role: must be"),
            (f"{base}/keys", {"name": "", "role": "gateway"}, "name: required"),
            (f"{base}/keys", {"name": "n" * 101, "role": "gateway"}, "name: required"),
            (f"{base}/credit", {"package_id": "", "order_id": _oid()},
             "package_id: choose a package"),
            (f"{base}/credit", {"package_id": "no-such-package", "order_id": _oid()},
             "no-such-package"),
            (f"{base}/credit", {"package_id": "individual-20"}, "order_id: missing"),
            (f"{base}/credit", {"package_id": "individual-20", "order_id": "po-1"},
             "order_id: missing or malformed"),
            (f"{base}/credit", {"amount": "1.00", "currency": "USD", "order_id": _oid()},
             "amount: must be between USD 5.00 and USD 10,000.00"),
            (f"{base}/credit", {"amount": "10000.01", "currency": "USD", "order_id": _oid()},
             "amount: must be between"),
            (f"{base}/credit", {"amount": "5.001", "currency": "USD", "order_id": _oid()},
             "amount: must be a positive amount with at most 2 decimals"),
            (f"{base}/credit", {"amount": "-5", "currency": "USD", "order_id": _oid()},
             "amount: must be a positive amount"),
            (f"{base}/credit", {"amount": "50", "currency": "EUR", "order_id": _oid()},
             "is not sold as a custom amount"),
            (f"{base}/top-up", {"threshold": "1", "max_per_day": "many"}, "max_per_day"),
            (f"{base}/top-up", {"threshold": "0.0000001"}, "threshold"),
        ]
        for path, fields, reason in cases:
            reply = await http.post(path, data={"csrf_token": token, **fields})
            assert 400 <= reply.status_code < 500, (path, fields, reply.status_code)
            assert reason in reply.text, (path, fields, reply.text[-400:])
            assert "Nothing was changed" in reply.text
    assert await _keys(suite) == keys_before
    assert [o.payment_order_id for o in await _orders(suite)] == [
        o.payment_order_id for o in orders_before]


async def test_health_and_readiness_answer_for_the_kubelet(suite: Suite) -> None:
    async with httpx.AsyncClient(base_url=suite.url) as http:
        assert (await http.get("/healthz")).status_code == 200
        ready = await http.get("/readyz")
        assert ready.status_code == 200 and ready.text == "ready\n"
        cache = suite.portal.server.config.app.state.portal.client.cache
        cache.ready.clear()  # as before the first snapshot of accounts' feed arrives
        try:
            assert (await http.get("/readyz")).status_code == 503
        finally:
            cache.ready.set()
