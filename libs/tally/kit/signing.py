"""Webhook signatures, Stripe-style, one way for every sender and receiver.

Header: `t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>[,v1=...]` — one v1 per
secret in use, so a receiver rotating its secret accepts either during the overlap. Checks
compare in constant time and refuse timestamps outside the tolerance (a replayed capture is
stale; a future one is forged or a broken clock).
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence
from typing import Final

TOLERANCE_S: Final = 300


def signature(secret: str, timestamp: int, body: bytes) -> str:
    """The hex HMAC-SHA256 of "<timestamp>.<body>" under `secret`."""
    return hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()


def sign(secrets: Sequence[str], timestamp: int, body: bytes) -> str:
    """The signature header for `body`, with one v1 per secret."""
    if not secrets:
        raise ValueError("no signing secret")
    return ",".join([f"t={timestamp}", *(f"v1={signature(s, timestamp, body)}" for s in secrets)])


class SignatureError(Exception):
    """Why a signature header was refused (the message says which check failed)."""


def verify(header: str, body: bytes, secrets: Sequence[str], now: int,
           tolerance_s: int = TOLERANCE_S) -> int:
    """Checks `header` against `body` with any of `secrets`; returns its timestamp.
    Raises SignatureError when malformed, stale, from the future, or unsigned by them."""
    timestamp: int | None = None
    candidates: list[str] = []
    for part in header.split(","):
        key, _, value = part.strip().partition("=")
        if key == "t" and value.isdigit():
            timestamp = int(value)
        elif key == "v1" and value:
            candidates.append(value)
    if timestamp is None or not candidates:
        raise SignatureError("malformed signature header")
    if timestamp < now - tolerance_s:
        raise SignatureError("timestamp outside the tolerance (stale)")
    if timestamp > now + tolerance_s:
        raise SignatureError("timestamp outside the tolerance (in the future)")
    matched = False
    for secret in secrets:
        expected = signature(secret, timestamp, body)
        for candidate in candidates:  # every comparison runs: no early exit to time
            matched |= hmac.compare_digest(expected, candidate)
    if not matched:
        raise SignatureError("no valid signature")
    return timestamp
