"""What the portal knows without any I/O: sessions and sign-in attempts, where a sign-in may
return to, the overview's burn rate, usage series and their CSV, and the limits on what a
page may ask for.

Money stays in integer micro-credits here; it becomes text only in templates (`credits`).
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import re
import secrets
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal, InvalidOperation
from typing import Final

from tally.kit.errors import Reason, TallyError
from tally.kit.money import MICROS_PER_CREDIT, format_credits, format_money, minor_digits

BURN_WINDOW_DAYS: Final = 7
"""The burn rate is the average daily spend over this many past days."""
MAX_HOURLY_DAYS: Final = 7
"""Longest range of an hourly chart (168 buckets)."""
MAX_DAILY_DAYS: Final = 92
"""Longest range of a daily chart."""
LOGIN_TTL_S: Final = 600.0
"""How long a started sign-in may take at the provider."""
_ORG_ID: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")


def bad_input(field_name: str, reason: str) -> TallyError:
    """A refusal naming the field and the reason (DESIGN §7)."""
    return TallyError(Reason.INVALID_ARGUMENT, f"{field_name}: {reason}", field=field_name)


def credits(micros: int) -> str:
    """Micro-credits as credits with thousands separators: 2_100_000_000 -> "2,100"."""
    text = format_credits(micros)
    whole, dot, frac = text.lstrip("-").partition(".")
    sign = "-" if micros < 0 else ""
    return f"{sign}{int(whole):,}{dot}{frac}"


# --- sign-in and sessions ----------------------------------------------------------------


def pkce_pair() -> tuple[str, str]:
    """A PKCE code verifier and its S256 challenge (RFC 7636)."""
    verifier = secrets.token_urlsafe(48)
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return verifier, base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def safe_next(target: str) -> str:
    """Where a sign-in may return to: a path on this portal, never another site
    (`//evil.example`, `https://...`, `/\\evil`, control characters are refused)."""
    if not target:
        return "/"
    if (not target.startswith("/") or target.startswith("//") or "\\" in target
            or any(ord(c) < 0x20 or c == "\x7f" for c in target) or len(target) > 512):
        raise bad_input("next", "must be a path on this portal (an open redirect is refused)")
    return target


def check_org_id(org_id: str) -> str:
    """An org id as it may appear in a URL."""
    if not _ORG_ID.match(org_id):
        raise bad_input("org_id", "not a valid org id")
    return org_id


@dataclass
class LoginAttempt:
    """A sign-in started here and not yet returned from the provider."""

    state: str
    verifier: str
    challenge: str
    nonce: str
    next_path: str
    started_at: float = field(default_factory=time.time)
    """Wall-clock seconds: a sign-in may return to another replica."""

    @property
    def is_expired(self) -> bool:
        return time.time() - self.started_at > LOGIN_TTL_S


def new_login(next_path: str) -> LoginAttempt:
    """A new sign-in attempt returning to `next_path` (already checked)."""
    verifier, challenge = pkce_pair()
    return LoginAttempt(secrets.token_urlsafe(24), verifier, challenge,
                        secrets.token_urlsafe(16), next_path)


@dataclass
class Session:
    """A signed-in person. Times are wall-clock seconds (sessions are shared by replicas)."""

    session_id: str
    subject: str
    csrf_token: str
    access_token: str = ""
    refresh_token: str = ""
    token_expires_at: float = 0.0
    expires_at: float = 0.0

    @property
    def is_expired(self) -> bool:
        return self.expires_at < time.time()


def new_session(subject: str, ttl_s: float, *, access_token: str = "",
                refresh_token: str = "", expires_in_s: float = 0.0) -> Session:
    """A new session with a fresh random id and CSRF token. A session id is made only when
    sign-in succeeds (never adopted from the browser), so an id planted before sign-in never
    becomes a signed-in session (session fixation)."""
    now = time.time()
    return Session(secrets.token_urlsafe(32), subject, secrets.token_urlsafe(32),
                   access_token, refresh_token, now + expires_in_s if expires_in_s else 0.0,
                   now + ttl_s)


def unknown_login() -> TallyError:
    return bad_input("state", "unknown or expired sign-in attempt; sign in again")


def csrf_ok(session: Session, submitted: str) -> bool:
    """Whether a form carried the session's CSRF token (constant-time compare)."""
    return bool(submitted) and secrets.compare_digest(session.csrf_token, submitted)


# --- overview ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Burn:
    """Average daily spend and how long the available credit lasts at that rate."""

    per_day_micros: int
    days_left: int | None
    """None: nothing spent in the window, so no end in sight."""


def burn(spent_micros: int, available_micros: int, window_days: int = BURN_WINDOW_DAYS) -> Burn:
    """The burn rate over `window_days` and the whole days of credit left at it."""
    per_day = spent_micros // window_days
    if per_day <= 0:
        return Burn(0, None)
    return Burn(per_day, max(available_micros, 0) // per_day)


# --- usage -------------------------------------------------------------------------------

DIMENSIONS: Final = ("model", "project", "label", "meter")


@dataclass(frozen=True, slots=True)
class UsageRange:
    """A chart's time range, [start, end) in UTC, and its bucket."""

    start: datetime
    end: datetime
    bucket: str  # "day" or "hour"


def parse_range(start: str, end: str, bucket: str, today: date) -> UsageRange:
    """The range a usage page asks for (dates YYYY-MM-DD, end inclusive); refuses bad or
    oversized ranges naming the field."""
    if bucket not in ("day", "hour"):
        raise bad_input("bucket", "must be day or hour")
    try:
        last = date.fromisoformat(end) if end else today
    except ValueError:
        raise bad_input("end", "must be a date YYYY-MM-DD") from None
    default_days = 1 if bucket == "hour" else 30
    try:
        first = date.fromisoformat(start) if start else last - timedelta(days=default_days - 1)
    except ValueError:
        raise bad_input("start", "must be a date YYYY-MM-DD") from None
    if first > last:
        raise bad_input("start", "must not be after end")
    days = (last - first).days + 1
    limit = MAX_HOURLY_DAYS if bucket == "hour" else MAX_DAILY_DAYS
    if days > limit:
        raise bad_input("end", f"the range is {days} days; at most {limit} days by {bucket}")
    begin = datetime(first.year, first.month, first.day, tzinfo=UTC)
    return UsageRange(begin, begin + timedelta(days=days), bucket)


def buckets(span: UsageRange) -> list[datetime]:
    """Every bucket start of the range, in order (empty buckets are charted as 0)."""
    step = timedelta(days=1) if span.bucket == "day" else timedelta(hours=1)
    found, at = [], span.start
    while at < span.end:
        found.append(at)
        at += step
    return found


@dataclass(frozen=True, slots=True)
class Series:
    """Credits per label (a bucket or a group), in display order."""

    labels: list[str]
    micros: list[int]

    @property
    def total_micros(self) -> int:
        return sum(self.micros)

    def rows(self) -> list[tuple[str, int]]:
        return list(zip(self.labels, self.micros, strict=True))

    def chart(self) -> dict[str, list[str] | list[float]]:
        """For the chart script: credits as numbers (display only, never summed back)."""
        return {"labels": self.labels, "values": [m / MICROS_PER_CREDIT for m in self.micros]}


def over_time(span: UsageRange, points: Iterable[tuple[datetime, int]]) -> Series:
    """Credits per bucket of `span` from (bucket start, micros) roll-up rows."""
    totals: dict[datetime, int] = {}
    for at, amount in points:
        totals[at] = totals.get(at, 0) + amount
    starts = buckets(span)
    fmt = "%Y-%m-%d" if span.bucket == "day" else "%m-%d %H:00"
    return Series([s.strftime(fmt) for s in starts], [totals.get(s, 0) for s in starts])


def by_group(rows: Iterable[tuple[str, int]], top: int = 12) -> Series:
    """Credits per group, largest first; the tail past `top` summed as "other"."""
    totals: dict[str, int] = {}
    for key, amount in rows:
        totals[key or "(none)"] = totals.get(key or "(none)", 0) + amount
    ordered = sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))
    head, tail = ordered[:top], ordered[top:]
    if tail:
        head.append(("other", sum(v for _, v in tail)))
    return Series([k for k, _ in head], [v for _, v in head])


def usage_csv(header: Sequence[str], rows: Iterable[Sequence[str | int]]) -> str:
    """RFC 4180 CSV (CRLF line ends, quoted where needed) of usage rows."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow(row)
    return out.getvalue()


def csv_amount(micros: int) -> str:
    """Credits with six decimals (a spreadsheet reads it as a number)."""
    sign = "-" if micros < 0 else ""
    whole, frac = divmod(abs(micros), MICROS_PER_CREDIT)
    return f"{sign}{whole}.{frac:06d}"


def parse_amount_minor(text: str, currency: str, min_minor: int, max_minor: int) -> int:
    """A custom purchase amount typed as money ("25" or "25.50") in minor units of
    `currency`, exactly (no floats), within [min_minor, max_minor]."""
    if not re.fullmatch(r"[A-Z]{3}", currency):
        raise bad_input("currency", "must be an ISO 4217 code such as USD")
    digits = minor_digits(currency)
    fraction = rf"(\.[0-9]{{1,{digits}}})?" if digits else ""
    if not re.fullmatch(rf"[0-9]{{1,12}}{fraction}", text.strip()):
        raise bad_input("amount", f"must be a positive amount with at most {digits} decimals")
    try:
        minor = int(Decimal(text.strip()).scaleb(digits))
    except InvalidOperation:
        raise bad_input("amount", "must be a number") from None
    if not min_minor <= minor <= max_minor:
        raise bad_input("amount", f"must be between {format_money(min_minor, currency)} and "
                                  f"{format_money(max_minor, currency)}")
    return minor


def headroom_percent(used: int, limit: int) -> int:
    """How much of a limit is used, 0..100 (for a headroom bar)."""
    if limit <= 0:
        return 0
    return max(0, min(100, used * 100 // limit))


def labelled(mapping: Mapping[str, str]) -> str:
    """Labels as `k=v, k=v` for a table cell."""
    return ", ".join(f"{k}={v}" for k, v in sorted(mapping.items()))
