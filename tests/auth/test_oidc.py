"""People sign in with OIDC: tokens from a local provider (discovery, JWKS, RS256) verified by
the kit, and every kind of bad token refused as UNAUTHENTICATED."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

import grpc
import pytest

from tally.accounts.v1 import accounts_pb2 as apb
from tally.kit.errors import Reason, TallyError
from tally.pricing.v1 import pricing_pb2 as pb
from tests.pricing.conftest import pricing_server
from tests.support.oidc_provider import SigningKey

from .conftest import Identities, bearer

INVITE = "/tally.accounts.v1.AccountsService/InviteMember"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, object], claims: dict[str, object], key: bytes | None) -> str:
    """A JWS assembled by hand (for the algorithms a library would refuse to produce)."""
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = (hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
                 if key is not None else b"")
    return f"{signing_input}.{_b64(signature)}"


async def refusal(ids: Identities, token: str, **guard_options: float) -> TallyError:
    guard = ids.guard(**guard_options)
    with pytest.raises(TallyError) as failure:
        await guard.verify(bearer(token), None)
    assert failure.value.reason is Reason.UNAUTHENTICATED, failure.value
    return failure.value


async def test_a_member_signed_in_with_oidc_acts_in_their_org_only(ids: Identities) -> None:
    guard = await ids.started(ids.guard())
    token = ids.provider.token("owner@acme.test")
    principal = await guard.verify(bearer(token), None)
    assert (principal.identity, principal.verified_by) == ("user:owner@acme.test", "oidc")
    request = apb.InviteMemberRequest(org_id="acme", subject="new@acme.test",
                                      role=apb.ROLE_VIEWER)
    await guard.admit(INVITE, bearer(token), None, request)
    request.org_id = "beta"
    with pytest.raises(TallyError) as other_org:
        await guard.admit(INVITE, bearer(token), None, request)
    assert other_org.value.reason is Reason.PERMISSION_DENIED
    assert "accounts.InviteMember" in other_org.value.message


async def test_a_verified_email_claim_finds_the_membership(ids: Identities) -> None:
    guard = await ids.started(ids.guard())
    token = ids.provider.token("opaque-subject-1", email="Owner@Acme.test",
                               email_verified=True)
    principal = await guard.verify(bearer(token), None)
    assert principal.roles_in("acme") == {"owner"}
    unverified = ids.provider.token("opaque-subject-1", email="owner@acme.test",
                                    email_verified=False)
    assert (await guard.verify(bearer(unverified), None)).roles_in("acme") == frozenset()


async def test_a_token_for_another_audience_is_refused(ids: Identities) -> None:
    error = await refusal(ids, ids.provider.token(aud="someone-else"))
    assert "audience" in error.message.lower()


async def test_a_token_from_another_issuer_is_refused(ids: Identities) -> None:
    error = await refusal(ids, ids.provider.token(iss="https://evil.example"))
    assert "issuer" in error.message.lower()


async def test_an_expired_token_is_refused_beyond_the_clock_skew(ids: Identities) -> None:
    now = int(time.time())
    error = await refusal(ids, ids.provider.token(iat=now - 600, nbf=now - 600, exp=now - 61))
    assert "expired" in error.message.lower()
    guard = ids.guard()  # within the 60 s skew it still counts
    await guard.verify(bearer(ids.provider.token(iat=now - 600, exp=now - 30)), None)


async def test_an_unsigned_token_is_refused(ids: Identities) -> None:
    token = hand_made({"alg": "none", "typ": "JWT", "kid": "k1"}, ids.provider.claims(), None)
    error = await refusal(ids, token)
    assert "'none'" in error.message


async def test_hs256_signed_with_the_public_key_is_refused(ids: Identities) -> None:
    public = ids.provider.published[0].public_pem()
    token = hand_made({"alg": "HS256", "typ": "JWT", "kid": "k1"}, ids.provider.claims(),
                      public)
    error = await refusal(ids, token)
    assert "HS256" in error.message


async def test_an_unknown_kid_refreshes_the_keys_once_then_is_refused(ids: Identities
                                                                      ) -> None:
    guard = ids.guard()
    await guard.verify(bearer(ids.provider.token()), None)
    fetched = ids.provider.jwks_fetches
    stranger = SigningKey("not-published")
    for _ in range(3):
        with pytest.raises(TallyError) as failure:
            await guard.verify(bearer(ids.provider.token(key=stranger)), None)
        assert failure.value.reason is Reason.UNAUTHENTICATED
    assert ids.provider.jwks_fetches == fetched  # refreshed within min_refresh_s: not again

    fresh = ids.guard(min_refresh_s=0)
    await fresh.verify(bearer(ids.provider.token()), None)
    fetched = ids.provider.jwks_fetches
    with pytest.raises(TallyError):
        await fresh.verify(bearer(ids.provider.token(key=stranger)), None)
    assert ids.provider.jwks_fetches == fetched + 1  # one refresh, then refused


async def test_a_key_the_provider_rotated_in_is_picked_up_on_first_sight(ids: Identities
                                                                        ) -> None:
    guard = ids.guard(min_refresh_s=0)
    await guard.verify(bearer(ids.provider.token()), None)
    rotated = SigningKey("k2")
    ids.provider.published.append(rotated)
    principal = await guard.verify(bearer(ids.provider.token("owner@acme.test", key=rotated)),
                                   None)
    assert principal.identity == "user:owner@acme.test"


async def test_a_signed_in_viewer_reads_the_catalog_through_a_real_server(
        ids: Identities, db_url: str) -> None:
    subject = await ids.person("acme", "viewer")
    guard = ids.guard()
    async with pricing_server(db_url, authenticator=guard) as (_, stub):
        await ids.synced(guard)
        token = ids.provider.token(subject)
        book = await stub.GetPriceBook(pb.GetPriceBookRequest(),
                                       metadata=tuple(bearer(token).items()))
        assert book.book.version == 1
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await stub.GetPriceBook(pb.GetPriceBookRequest(), metadata=tuple(
                bearer(ids.provider.token(subject, aud="other")).items()))
        assert failure.value.code() is grpc.StatusCode.UNAUTHENTICATED
