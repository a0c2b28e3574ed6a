"""The portal over plain HTTP (no browser): sign-in through the OIDC provider with PKCE,
session and CSRF rules, pages with real data, the policy table on every action, bad input."""

from __future__ import annotations

from tests.portal.support import ORG, PEOPLE, Suite, signed_in


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
