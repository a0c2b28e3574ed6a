"""Stripe-style webhook signatures: round trip, rotation overlap, and every refusal."""

from __future__ import annotations

import pytest

from tally.kit.signing import SignatureError, sign, verify

BODY = b'{"id": "evt_1"}'
NOW = 1_800_000_000


def test_a_signed_body_verifies_with_its_secret_and_returns_the_timestamp() -> None:
    header = sign(["whsec_a"], NOW, BODY)
    assert header.startswith(f"t={NOW},v1=")
    assert verify(header, BODY, ["whsec_a"], NOW + 10) == NOW


def test_during_rotation_either_secret_verifies() -> None:
    header = sign(["whsec_new", "whsec_old"], NOW, BODY)
    assert verify(header, BODY, ["whsec_old"], NOW) == NOW
    assert verify(header, BODY, ["whsec_new"], NOW) == NOW


@pytest.mark.parametrize(("header", "secrets", "now", "why"), [
    (sign(["whsec_a"], NOW, BODY), ["whsec_b"], NOW, "no valid signature"),
    (sign(["whsec_a"], NOW, BODY + b" "), ["whsec_a"], NOW, "no valid signature"),
    (sign(["whsec_a"], NOW - 301, BODY), ["whsec_a"], NOW, "stale"),
    (sign(["whsec_a"], NOW + 301, BODY), ["whsec_a"], NOW, "future"),
    ("v1=abc", ["whsec_a"], NOW, "malformed"),
    (f"t={NOW}", ["whsec_a"], NOW, "malformed"),
])
def test_forged_tampered_stale_future_and_malformed_headers_are_refused(
        header: str, secrets: list[str], now: int, why: str) -> None:
    with pytest.raises(SignatureError, match=why):
        verify(header, BODY, secrets, now)
