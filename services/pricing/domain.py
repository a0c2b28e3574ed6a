"""Pricing's rules: published price books, quotes, the watch feed, simulation and margin.

Every charge traces back to one published price book version. Books are immutable once
published; the book in force at instant T is the one with the latest `effective_from` <= T,
and because a later version must also take effect later (`check_effective_from`), that is
also the highest version in force — the proto's wording.

Each replica keeps every published book in memory (`BookCache`): books are small, and Quote,
GetPriceBook and WatchPriceBook must not touch the database per call. The database is the
source of truth: a publish on any replica is pushed to every replica's cache by the store's
change feed (LISTEN/NOTIFY, with a poll as a safety net) and from there to every
WatchPriceBook subscriber.

No grpc and no SQL here: the store and the metering adapter implement the protocols below.
"""

from __future__ import annotations

import asyncio
import bisect
import hashlib
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from typing import Final, Protocol

from tally.kit.errors import FieldViolation, Reason, TallyError, invalid, invalid_fields
from tally.kit.log import get_logger
from tally.kit.money import INT64_MAX
from tally.kit.paging import (
    decode_cursor,
    encode_cursor,
    encode_token,
    next_offset_token,
    page_problems,
    page_request,
)
from tally.rating import (
    BelowCostWarning,
    CreditPackage,
    Meter,
    PriceBook,
    PriceBookHistory,
    Quote,
    RatingError,
    SimulationRecord,
    UsageMode,
    below_cost,
    rate,
    simulate,
    validate,
)

log = get_logger("pricing.domain")

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
"""effective_from of the bootstrap book (version 1): in force for any usage, however old."""

BOOTSTRAP_REQUEST_ID: Final = "bootstrap:default-catalog"
BOOTSTRAP_ACTOR: Final = "system:pricing-bootstrap"

# Limits of a draft (the proto's "At most ..." on each field).
MAX_LINES: Final = 10_000
MAX_MODELS: Final = 1_000
MAX_COSTS: Final = 10_000
MAX_PACKAGES: Final = 100
MAX_TIERS: Final = 20
MAX_ALIASES: Final = 20
MAX_FALLBACKS: Final = 10
MAX_NOTE_CHARS: Final = 2_000
MAX_REQUEST_ID_CHARS: Final = 128
MAX_QUOTE_QUANTITIES: Final = 20
MAX_WINDOW: Final = timedelta(days=93)
"""Longest SimulatePriceChange / MarginReport window."""

_DISPLAY_PLACES: Final = Decimal("1e-12")


def utcnow() -> datetime:
    """The service clock (tests pass their own)."""
    return datetime.now(UTC)


# --- published books ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PublishedBook:
    """One published version: the rating book plus what publishing added to it.

    `book.version` is `str(version)` (the rating library keys books by string).
    """

    version: int
    published_at: datetime
    published_by: str
    book: PriceBook
    custom_credit_price_minor: Mapping[str, Decimal] = field(default_factory=dict)

    @property
    def effective_from(self) -> datetime:
        """When this version takes effect."""
        return self.book.effective_from

    @property
    def note(self) -> str:
        """Release note."""
        return self.book.note


@dataclass(frozen=True, slots=True)
class VersionHeader:
    """A published version without its lines (ListPriceBookVersions)."""

    version: int
    effective_from: datetime
    published_at: datetime
    published_by: str
    note: str


@dataclass(frozen=True, slots=True)
class Draft:
    """A price book submitted for publishing or simulation, with the problems found while
    reading it off the wire (bad decimals, unset enums, over-long lists)."""

    book: PriceBook
    custom_credit_price_minor: Mapping[str, Decimal]
    parse_problems: Sequence[FieldViolation] = ()


@dataclass(frozen=True, slots=True)
class PublishCommand:
    """A validated publish request."""

    request_id: str
    request_hash: str
    draft: Draft
    effective_from: datetime | None
    published_by: str
    removed_models: frozenset[str] = frozenset()
    """Models the draft drops on purpose (see `removal_problems`)."""
    removed_meters: frozenset[Meter] = frozenset()
    """Meters the draft stops pricing on purpose."""


@dataclass(frozen=True, slots=True)
class PublishResult:
    """The published version, its below-cost warnings, and whether this was a replay."""

    published: PublishedBook
    warnings: Sequence[BelowCostWarning]
    is_replay: bool


def request_fingerprint(canonical_bytes: bytes) -> str:
    """SHA-256 of a request's canonical (deterministic) serialization."""
    return hashlib.sha256(canonical_bytes).hexdigest()


def check_effective_from(
    effective_from: datetime, now: datetime, latest: datetime | None
) -> None:
    """The publish-time rule: never in the past, and later than every published book.

    So no usage already rated is ever repriced, and versions and effective times ascend
    together (the book in force is both the latest-effective and the highest version).
    """
    if effective_from < now:
        raise invalid("effective_from", f"{effective_from.isoformat()} is in the past "
                      f"(now {now.isoformat()}); books never apply retroactively")
    if latest is not None and effective_from <= latest:
        raise invalid("effective_from", f"must be later than {latest.isoformat()}, when the "
                      "latest published book takes effect")


def removal_problems(newest: PublishedBook | None, command: PublishCommand
                     ) -> list[FieldViolation]:
    """An empty draft, or one that drops a model or a meter of the newest published book
    without listing it in removed_models / removed_meters.

    Anything the newest book prices may still be in use — usage arriving late within the
    event window, open reservations, budgets, aliases in callers' configuration — and a book
    without it rejects all of that (UNKNOWN_MODEL / PRICE_NOT_FOUND), so a drop must be said
    out loud rather than be the accident of an incomplete draft."""
    book = command.draft.book
    if not book.models and not book.lines:
        return [FieldViolation("draft", "is empty: a book without models or lines would "
                                        "reject every usage event")]
    if newest is None:
        return []
    found = []
    kept_models = {entry.model for entry in book.models}
    dropped = sorted({entry.model for entry in newest.book.models} - kept_models
                     - command.removed_models)
    if dropped:
        found.append(FieldViolation("draft.models", f"drops {', '.join(dropped)} of version "
                                    f"{newest.version}; list them in removed_models to "
                                    "remove them"))
    kept_meters = {line.meter for line in book.lines}
    unpriced = sorted(str(m) for m in {line.meter for line in newest.book.lines}
                      - kept_meters - command.removed_meters)
    if unpriced:
        found.append(FieldViolation("draft.lines", f"no longer prices {', '.join(unpriced)} "
                                    f"of version {newest.version}; list them in "
                                    "removed_meters to remove them"))
    return found


def draft_problems(draft: Draft) -> list[FieldViolation]:
    """Every reason `draft` cannot be published: wire problems, then the rating library's
    `validate`, each as a field path under `draft.`."""
    found = list(draft.parse_problems)
    found.extend(FieldViolation(f"draft.{p.field}", p.message) for p in validate(draft.book))
    book = draft.book
    for name, items, limit in (("lines", book.lines, MAX_LINES), ("models", book.models,
                               MAX_MODELS), ("costs", book.costs, MAX_COSTS),
                               ("packages", book.packages, MAX_PACKAGES)):
        if len(items) > limit:
            found.append(FieldViolation(f"draft.{name}", f"at most {limit}, got {len(items)}"))
    if len(book.note) > MAX_NOTE_CHARS:
        found.append(FieldViolation("draft.note", f"at most {MAX_NOTE_CHARS} characters"))
    for line in book.lines:
        if len(line.tiers) > MAX_TIERS:
            found.append(FieldViolation(f"draft.lines[{line.line_id}].tiers",
                                        f"at most {MAX_TIERS} tiers"))
    for entry in book.models:
        if len(entry.aliases) > MAX_ALIASES:
            found.append(FieldViolation(f"draft.models[{entry.model}].aliases",
                                        f"at most {MAX_ALIASES} aliases"))
        if len(entry.fallback_models) > MAX_FALLBACKS:
            found.append(FieldViolation(f"draft.models[{entry.model}].fallback_models",
                                        f"at most {MAX_FALLBACKS} fallback models"))
    for currency, price in draft.custom_credit_price_minor.items():
        if len(currency) != 3 or not currency.isascii() or not currency.isupper():
            found.append(FieldViolation(f"draft.custom_credit_price_minor[{currency}]",
                                        "key must be an ISO 4217 code such as USD"))
        if price <= 0:
            found.append(FieldViolation(f"draft.custom_credit_price_minor[{currency}]",
                                        "price per credit must be > 0"))
    return found


def parse_decimal(text: str) -> Decimal | None:
    """An exact, finite decimal from its wire text, or None."""
    try:
        value = Decimal(text.strip())
    except (InvalidOperation, ValueError):
        return None
    return value if value.is_finite() else None


def fraction_text(value: Fraction) -> str:
    """An exact decimal string when the fraction terminates, else rounded at 1e-12."""
    denominator = value.denominator
    for prime in (2, 5):
        while denominator % prime == 0:
            denominator //= prime
    if denominator == 1:
        scale = 0
        while (10**scale) % value.denominator:
            scale += 1
        exact = Decimal(value.numerator * (10**scale // value.denominator)).scaleb(-scale)
        return format(exact.normalize(), "f")
    approx = (Decimal(value.numerator) / Decimal(value.denominator)).quantize(_DISPLAY_PLACES)
    return format(approx.normalize(), "f")


# --- the stores this domain needs ------------------------------------------------------------


class PriceBookStore(Protocol):
    """Durable, append-only price books (the Postgres implementation is `store.py`)."""

    async def books_after(self, version: int) -> list[PublishedBook]:
        """Every published book with a version above `version`, ascending."""
        ...

    async def publish(self, command: PublishCommand, now: datetime) -> tuple[PublishedBook, bool]:
        """Appends the draft as the next version (or replays `command.request_id`); applies
        `check_effective_from` under the publish lock. Returns (book, is_replay)."""
        ...

    async def bootstrap(self, book: PriceBook, custom: Mapping[str, Decimal],
                        now: datetime) -> bool:
        """Publishes `book` as version 1 from the epoch if no book exists; True if it did."""
        ...

    async def versions(self, before_version: int | None, limit: int) -> list[VersionHeader]:
        """Version headers below `before_version` (None = from the newest), newest first."""
        ...


@dataclass(frozen=True, slots=True)
class RecordedUsage:
    """One usage event as metering recorded it, with what it was charged."""

    org_id: str
    occurred_at: datetime
    model: str
    resolved_model: str
    provider: str
    mode: UsageMode
    region: str
    quantities: Mapping[Meter, int]
    charged_micros: int
    price_book_version: int


@dataclass(frozen=True, slots=True)
class InUse:
    """Something that still uses a model or meter a book would drop (metering's answer)."""

    item: str
    """"model <name>" or "meter <METER_NAME>"."""
    recent_events: int
    open_holds: int
    quota_ids: tuple[str, ...]
    budget_ids: tuple[str, ...]

    def describe(self) -> str:
        found = []
        if self.recent_events:
            found.append(f"{self.recent_events} usage events within the late-event window "
                         "(35 days; a late event can still arrive)")
        if self.open_holds:
            found.append(f"{self.open_holds} open authorization holds")
        if self.quota_ids:
            found.append(f"quotas {', '.join(self.quota_ids)}")
        if self.budget_ids:
            found.append(f"budgets {', '.join(self.budget_ids)}")
        return f"{self.item}: {'; '.join(found)}"


def removed_items(newest: PublishedBook | None, command: PublishCommand
                  ) -> tuple[list[str], list[Meter]]:
    """The models and meters the newest book prices that the draft drops (on purpose: listed
    in removed_models / removed_meters, as removal_problems requires)."""
    if newest is None:
        return [], []
    book = command.draft.book
    models = sorted({e.model for e in newest.book.models} - {e.model for e in book.models})
    meters = sorted({line.meter for line in newest.book.lines}
                    - {line.meter for line in book.lines})
    return models, meters


def in_use_error(uses: Sequence[InUse]) -> TallyError:
    """PRICE_IN_USE naming everything that still uses what the book would drop."""
    return TallyError(Reason.PRICE_IN_USE, "the book drops what is still in use: "
                      + " | ".join(u.describe() for u in uses)
                      + "; publish the removal once none of it remains (holds expire, quotas "
                        "can be changed, late usage ages out of the window)")


class UsageSource(Protocol):
    """Recorded usage, owned by metering (the gRPC implementation is `adapters.py`)."""

    async def in_use(self, models: Sequence[str], meters: Sequence[Meter]) -> list[InUse]:
        """What still uses each of `models` and `meters` (only those with some use).
        Raises TallyError UNAVAILABLE when metering cannot be asked."""
        ...

    def recorded_usage(self, org_id: str, start: datetime, end: datetime
                       ) -> AsyncIterator[RecordedUsage]:
        """Events with occurred_at in [start, end) of `org_id` ("" = every org), each org's
        events oldest first."""
        ...


# --- the in-memory cache and the watch feed ----------------------------------------------------


class BookCache:
    """Every published book of this replica, and the subscribers waiting for new ones."""

    def __init__(self, *, max_watchers: int, watcher_queue: int = 64) -> None:
        self._by_version: dict[int, PublishedBook] = {}
        self._history = PriceBookHistory()
        self._starts: list[datetime] = []
        self._ordered: list[PublishedBook] = []
        self._subscribers: set[asyncio.Queue[PublishedBook | None]] = set()
        self.max_watchers = max_watchers
        self.watcher_queue = watcher_queue

    @property
    def latest_version(self) -> int:
        """Highest version held (0 when none)."""
        return self._ordered[-1].version if self._ordered else 0

    @property
    def newest(self) -> PublishedBook | None:
        """The book published last (the one taking effect last), or None."""
        return self._ordered[-1] if self._ordered else None

    @property
    def history(self) -> PriceBookHistory:
        """The rating library's view of every book held."""
        return self._history

    def add(self, books: Iterable[PublishedBook]) -> list[PublishedBook]:
        """Takes newly read books (ascending); returns those not held before, after telling
        every subscriber about them."""
        fresh = [b for b in books if b.version not in self._by_version]
        for published in fresh:
            self._by_version[published.version] = published
            self._ordered.append(published)
            self._history = self._history.with_book(published.book)
        self._ordered.sort(key=lambda b: b.effective_from)
        self._starts = [b.effective_from for b in self._ordered]
        for published in fresh:
            for queue in list(self._subscribers):
                if queue.full():  # a subscriber this far behind reconnects and resyncs
                    while not queue.empty():
                        queue.get_nowait()
                    queue.put_nowait(None)
                    self._subscribers.discard(queue)
                else:
                    queue.put_nowait(published)
        return fresh

    def version(self, version: int) -> PublishedBook | None:
        """The book with this version, if held."""
        return self._by_version.get(version)

    def at(self, instant: datetime) -> PublishedBook:
        """The book in force at `instant`; PRICE_NOT_FOUND if none was."""
        index = bisect.bisect_right(self._starts, instant)
        if index == 0:
            raise TallyError(Reason.PRICE_NOT_FOUND,
                             f"no price book was in force at {instant.isoformat()}", field="at")
        return self._ordered[index - 1]

    def since(self, instant: datetime) -> list[PublishedBook]:
        """Every book in force at some moment from `instant` on, oldest first (including
        books scheduled for the future)."""
        index = max(bisect.bisect_right(self._starts, instant) - 1, 0)
        return list(self._ordered[index:])

    def subscribe(self) -> asyncio.Queue[PublishedBook | None]:
        """A queue receiving every book added from now on (None = fell behind: end)."""
        if len(self._subscribers) >= self.max_watchers:
            raise TallyError(Reason.UNAVAILABLE, f"this replica already serves "
                             f"{self.max_watchers} price book watchers; retry elsewhere")
        queue: asyncio.Queue[PublishedBook | None] = asyncio.Queue(self.watcher_queue)
        self._subscribers.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[PublishedBook | None]) -> None:
        """Stops feeding `queue`."""
        self._subscribers.discard(queue)

    def close_subscribers(self) -> None:
        """Ends every watch stream (shutdown)."""
        for queue in list(self._subscribers):
            while not queue.empty():
                queue.get_nowait()
            queue.put_nowait(None)
        self._subscribers.clear()


# --- pages and reports -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PackagePage:
    """One page of credit packages and the book they come from."""

    packages: Sequence[CreditPackage]
    next_page_token: str
    price_book_version: int


@dataclass(frozen=True, slots=True)
class VersionPage:
    """One page of version headers, newest first."""

    versions: Sequence[VersionHeader]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class QuoteCommand:
    """A Quote request in domain terms."""

    model: str
    mode: UsageMode
    region: str
    quantities: Mapping[Meter, int]
    period_quantities: Mapping[Meter, int]
    at: datetime | None
    is_estimate: bool


@dataclass(frozen=True, slots=True)
class OrgDeltaRow:
    """One org's charges versus the draft's (SimulatePriceChange)."""

    org_id: str
    current_micros: int
    simulated_micros: int
    events: int
    unrated_events: int

    @property
    def delta_micros(self) -> int:
        """simulated - current (negative = the draft is cheaper)."""
        return self.simulated_micros - self.current_micros


@dataclass(frozen=True, slots=True)
class SimulationPage:
    """One page of per-org deltas, ordered by org_id."""

    deltas: Sequence[OrgDeltaRow]
    next_page_token: str


@dataclass(frozen=True, slots=True)
class MarginRowData:
    """Revenue versus upstream cost for one (model, provider)."""

    model: str
    provider: str
    revenue_micros: int
    cost_micros: int

    @property
    def margin_micros(self) -> int:
        """revenue - cost."""
        return self.revenue_micros - self.cost_micros

    @property
    def margin_bps(self) -> int:
        """margin / revenue in basis points, truncated toward zero; 0 without revenue."""
        if self.revenue_micros <= 0:
            return 0
        bps = abs(self.margin_micros) * 10_000 // self.revenue_micros
        bps = min(bps, 2**31 - 1)
        return -bps if self.margin_micros < 0 else bps


@dataclass(frozen=True, slots=True)
class MarginPage:
    """One page of margin rows, ordered by (model, provider)."""

    rows: Sequence[MarginRowData]
    next_page_token: str


# --- the service ------------------------------------------------------------------------------


def rating_error(error: RatingError, prefix: str = "") -> TallyError:
    """The kit error for a rating-library error (same reason names)."""
    return TallyError(Reason(error.reason.value), f"{prefix}{error.field}: {error.message}",
                      field=f"{prefix}{error.field}")


class Pricing:
    """Pricing's use cases over a book store, the in-memory cache and metering's usage."""

    def __init__(self, store: PriceBookStore, usage: UsageSource, cache: BookCache, *,
                 max_report_events: int, clock: Callable[[], datetime] = utcnow) -> None:
        self.store = store
        self.usage = usage
        self.cache = cache
        self.max_report_events = max_report_events
        self.clock = clock
        self._refresh_lock = asyncio.Lock()

    # -- keeping the cache current ---------------------------------------------------------

    async def refresh(self) -> list[PublishedBook]:
        """Reads books published since the newest held (by any replica) into the cache."""
        async with self._refresh_lock:
            return self.cache.add(await self.store.books_after(self.cache.latest_version))

    async def bootstrap(self, book: PriceBook, custom: Mapping[str, Decimal]) -> None:
        """Publishes the default catalog as version 1 if the store is empty, then loads."""
        if await self.store.bootstrap(book, custom, self.clock()):
            log.info("price_book_bootstrapped", version=1, catalog=book.version)
        await self.refresh()

    # -- publishing ------------------------------------------------------------------------

    async def publish(self, command: PublishCommand) -> PublishResult:
        """Validates and publishes (or replays) a draft; INVALID_ARGUMENT lists every problem."""
        problems: list[FieldViolation] = []
        if not command.request_id:
            problems.append(FieldViolation("request_id", "is required"))
        elif len(command.request_id) > MAX_REQUEST_ID_CHARS:
            problems.append(FieldViolation("request_id",
                                           f"at most {MAX_REQUEST_ID_CHARS} characters"))
        problems.extend(draft_problems(command.draft))
        problems.extend(removal_problems(self.cache.newest, command))
        if problems:
            raise invalid_fields(problems)
        models, meters = removed_items(self.cache.newest, command)
        if models or meters:
            uses = await self.usage.in_use(models, meters)
            if uses:
                raise in_use_error(uses)
        published, is_replay = await self.store.publish(command, self.clock())
        await self.refresh()
        log.info("price_book_published", version=published.version, replay=is_replay,
                 effective_from=published.effective_from.isoformat(),
                 published_by=published.published_by)
        return PublishResult(published, below_cost(published.book), is_replay)

    # -- reading ---------------------------------------------------------------------------

    async def get(self, version: int, at: datetime | None) -> PublishedBook:
        """A version, or the book in force at `at` (default now)."""
        if version < 0:
            raise invalid("version", "must be >= 0 (0 = the book in force)")
        if version == 0:
            return self.cache.at(at or self.clock())
        found = self.cache.version(version)
        if found is None:  # maybe published on another replica a moment ago
            await self.refresh()
            found = self.cache.version(version)
        if found is None:
            raise TallyError(Reason.PRICE_NOT_FOUND, f"version: no price book version {version}",
                             field="version")
        return found

    async def list_versions(self, page_size: int, page_token: str) -> VersionPage:
        """Published versions, newest first (keyset on version)."""
        request = page_request(page_size, page_token, kind="version")
        rows = await self.store.versions(request.position, request.page_size + 1)
        chosen = rows[: request.page_size]
        token = ""
        if len(rows) > request.page_size:
            token = encode_token("version", chosen[-1].version)
        return VersionPage(chosen, token)

    def list_packages(self, page_size: int, page_token: str) -> PackagePage:
        """One page of the credit packages of the book in force now."""
        request = page_request(page_size, page_token)
        current = self.cache.at(self.clock())
        packages = current.book.packages
        chosen = packages[request.offset : request.offset + request.page_size]
        token = next_offset_token(request, len(chosen), len(packages))
        return PackagePage(chosen, token, current.version)

    # -- quoting ---------------------------------------------------------------------------

    def quote(self, command: QuoteCommand) -> tuple[Quote, PublishedBook]:
        """Prices `command` with the book in force at its instant (default now)."""
        published = self.cache.at(command.at or self.clock())
        book = published.book
        try:
            prior: dict[str, int] | None = None
            if command.period_quantities:
                resolved = book.resolve_model(command.model).model if command.model else ""
                prior = {}
                for meter, quantity in command.period_quantities.items():
                    line = book.find_line(resolved, meter, command.mode)
                    if line is not None:
                        prior[line.line_id] = quantity
            quote = rate(book, command.model, command.mode, command.region,
                         command.quantities, prior)
        except RatingError as exc:
            raise rating_error(exc) from None
        return quote, published

    # -- watching --------------------------------------------------------------------------

    async def watch(self, known_version: int, history_since: datetime | None,
                    lifetime_s: float) -> AsyncIterator[PublishedBook]:
        """History (if asked), the book in force now (unless the caller holds it), books
        already scheduled for later, then every newly published book, until `lifetime_s`."""
        queue = self.cache.subscribe()  # first, so nothing published meanwhile is missed
        try:
            sent: set[int] = set()
            for published in self._opening(known_version, history_since):
                sent.add(published.version)
                yield published
            loop = asyncio.get_running_loop()
            deadline = loop.time() + lifetime_s
            while True:
                try:
                    async with asyncio.timeout_at(deadline):
                        published_or_end = await queue.get()
                except TimeoutError:
                    return
                if published_or_end is None:
                    return
                if published_or_end.version in sent or published_or_end.version <= known_version:
                    continue
                sent.add(published_or_end.version)
                yield published_or_end
        finally:
            self.cache.unsubscribe(queue)

    def _opening(self, known_version: int, history_since: datetime | None
                 ) -> list[PublishedBook]:
        now = self.clock()
        current = self.cache.at(now)
        opening: list[PublishedBook] = []
        if history_since is not None:
            opening.extend(b for b in self.cache.since(history_since)
                           if b.effective_from < current.effective_from)
        if current.version != known_version:
            opening.append(current)
        opening.extend(b for b in self.cache.since(now)
                       if b.effective_from > now and b.version > known_version)
        return opening

    # -- simulation and margin -------------------------------------------------------------

    async def _records(self, org_id: str, start: datetime, end: datetime
                       ) -> list[RecordedUsage]:
        records: list[RecordedUsage] = []
        async for record in self.usage.recorded_usage(org_id, start, end):
            records.append(record)
            if len(records) > self.max_report_events:
                raise TallyError(Reason.INVALID_ARGUMENT, f"start_time: the window holds more "
                                 f"than {self.max_report_events} events; narrow it",
                                 field="start_time")
        records.sort(key=lambda r: (r.occurred_at, r.org_id))
        return records

    async def simulate(self, draft: Draft, start: datetime | None, end: datetime | None,
                       org_id: str, page_size: int, page_token: str) -> SimulationPage:
        """Re-rates the window's recorded usage under `draft`; one delta per org."""
        problems = [FieldViolation(p.field, p.description) for p in draft_problems(draft)]
        window, window_problems = _window(start, end)
        problems.extend(window_problems)
        problems.extend(page_problems(page_size, ""))
        after = decode_cursor(page_token, "simulate")
        if problems:
            raise invalid_fields(problems)
        assert window is not None
        records = await self._records(org_id, *window)
        deltas = simulate(
            (SimulationRecord(r.org_id, r.occurred_at, r.model, r.mode, r.region, r.quantities,
                              r.charged_micros) for r in records),
            self.cache.history, draft.book)
        rows = [OrgDeltaRow(d.org_id, d.charged_micros, d.draft_micros, d.events,
                            d.unrated_events) for _, d in sorted(deltas.items())]
        if after:
            rows = [r for r in rows if r.org_id > str(after[0])]
        size = page_size or 100
        chosen = rows[:size]
        token = encode_cursor("simulate", chosen[-1].org_id) if len(rows) > size else ""
        return SimulationPage(chosen, token)

    async def margin(self, start: datetime | None, end: datetime | None, page_size: int,
                     page_token: str) -> MarginPage:
        """Revenue (what was charged) versus upstream cost (the provider cost profiles of the
        book each event was rated with) per (model, provider)."""
        window, problems = _window(start, end)
        problems.extend(page_problems(page_size, page_token))
        if problems:
            raise invalid_fields(problems)
        request = page_request(page_size, page_token)
        assert window is not None
        revenue: dict[tuple[str, str], int] = defaultdict(int)
        cost: dict[tuple[str, str], Fraction] = defaultdict(Fraction)
        for record in await self._records("", *window):
            published = (self.cache.version(record.price_book_version)
                         or self._at_or_none(record.occurred_at))
            model, provider = record.resolved_model or record.model, record.provider
            event_cost = Fraction(0)
            if published is not None:
                book = published.book
                if record.model and book.has_model(record.model):
                    entry = book.resolve_model(record.model)
                    model, provider = entry.model, entry.provider
                for meter, quantity in record.quantities.items():
                    upstream = book.provider_cost(model, meter, record.mode)
                    if upstream is not None and upstream.per_units > 0:
                        event_cost += (Fraction(upstream.cost_rate) * quantity * 1_000_000
                                       / upstream.per_units)
            revenue[(model, provider)] += record.charged_micros
            cost[(model, provider)] += event_cost
        keys = sorted(revenue)
        rows = [MarginRowData(m, p, revenue[(m, p)], min(int(cost[(m, p)]), INT64_MAX))
                for m, p in keys]
        chosen = rows[request.offset : request.offset + request.page_size]
        return MarginPage(chosen, next_offset_token(request, len(chosen), len(rows)))

    def _at_or_none(self, instant: datetime) -> PublishedBook | None:
        try:
            return self.cache.at(instant)
        except TallyError:
            return None


def _window(start: datetime | None, end: datetime | None
            ) -> tuple[tuple[datetime, datetime] | None, list[FieldViolation]]:
    problems: list[FieldViolation] = []
    if start is None:
        problems.append(FieldViolation("start_time", "is required"))
    if end is None:
        problems.append(FieldViolation("end_time", "is required"))
    if start is None or end is None:
        return None, problems
    if end <= start:
        problems.append(FieldViolation("end_time", "must be after start_time"))
    elif end - start > MAX_WINDOW:
        problems.append(FieldViolation("end_time", f"at most {MAX_WINDOW.days} days after "
                                       "start_time"))
    return (start, end), problems

