"""Two portal replicas behind one load balancer share sessions through Redis: a sign-in
started on one returns to the other, a session made on one is valid on the other, a sign-out
on one ends it on both, and a replayed callback is refused by every replica."""

from __future__ import annotations

import httpx

from services.portal.routes import SESSION_COOKIE
from tests.portal.support import ORG, PEOPLE, Suite, another_replica, csrf_of


async def test_two_replicas_share_sign_in_and_sessions_through_redis(suite: Suite) -> None:
    async with another_replica(suite) as replica, httpx.AsyncClient(
            follow_redirects=False, timeout=15.0) as browser:
        first, second = suite.url, replica.url
        # the sign-in starts on the first replica ...
        to_provider = await browser.get(f"{first}/sign-in?next=/orgs/{ORG}/usage")
        assert to_provider.status_code == 303
        form = dict(httpx.URL(to_provider.headers["location"]).params)
        form["username"] = PEOPLE["viewer"]
        approved = await browser.post(f"{suite.oidc.issuer}/authorize", data=form)
        query = httpx.URL(approved.headers["location"]).query.decode()
        # ... and the load balancer sends the callback to the second
        done = await browser.get(f"{second}/auth/callback?{query}")
        assert done.status_code == 303, done.text
        assert done.headers["location"] == f"/orgs/{ORG}/usage"
        session_id = browser.cookies[SESSION_COOKIE]
        for url in (first, second):
            page = await browser.get(f"{url}/orgs/{ORG}/overview")
            assert page.status_code == 200, (url, page.text[-300:])
            assert PEOPLE["viewer"] in page.text
        # the code and state were used once: replaying the callback fails on either replica
        for url in (first, second):
            replay = await browser.get(f"{url}/auth/callback?{query}")
            assert replay.status_code == 400, url
        assert browser.cookies[SESSION_COOKIE] == session_id
        # a form made on one replica is accepted by the other (same CSRF token)
        token = csrf_of((await browser.get(f"{first}/orgs/{ORG}/overview")).text)
        out = await browser.post(f"{second}/sign-out", data={"csrf_token": token})
        assert out.status_code == 303
        # signed out on the second: the old cookie is dead on the first too
        browser.cookies.set(SESSION_COOKIE, session_id)
        after = await browser.get(f"{first}/orgs/{ORG}/overview")
        assert after.status_code == 303 and after.headers["location"].startswith("/sign-in")
