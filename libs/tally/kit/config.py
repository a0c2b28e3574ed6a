"""Frozen, typed configuration read from `TALLY_*` environment variables.

A config class is a frozen dataclass whose fields are declared with `setting(...)`; `load()`
reads every field from the environment at once and reports *all* bad values together. A
process that cannot start with its configuration exits with one line per bad variable, naming
the variable and what it expects (`exit_on_config_error`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, TypeVar

T = TypeVar("T")
C = TypeVar("C")

_META_KEY: Final = "tally_setting"


class ConfigError(Exception):
    """One or more environment variables are missing or malformed."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        super().__init__("; ".join(f"{var}: {why}" for var, why in problems))

    def lines(self) -> list[str]:
        """One line per bad variable: `TALLY_X: expected ..., got '...'`."""
        return [f"config error: {var}: {why}" for var, why in self.problems]


@dataclass(frozen=True, slots=True)
class _Setting:
    env: str
    parse: Callable[[str], Any]
    expects: str
    required: bool
    secret: bool = False


_NO_DEFAULT: Final = object()


def setting(
    env: str,
    parse: Callable[[str], T],
    expects: str,
    default: T | object = _NO_DEFAULT,
    *,
    secret: bool = False,
) -> Any:
    """Declares a dataclass field read from environment variable `env`.

    `parse` turns the raw string into the value and raises ValueError on bad input;
    `expects` says in words what a good value looks like, for the error line. A `secret`
    setting's value never appears in an error line (only its length does).
    """
    meta = {_META_KEY: _Setting(env, parse, expects, required=default is _NO_DEFAULT,
                                secret=secret)}
    if default is _NO_DEFAULT:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def load(cls: type[C], environ: Mapping[str, str] | None = None) -> C:
    """Builds `cls` from the environment, raising ConfigError listing every bad variable."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    problems: list[tuple[str, str]] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        spec: _Setting | None = f.metadata.get(_META_KEY)
        if spec is None:
            continue
        raw = env.get(spec.env)
        if raw is None or raw == "":
            if spec.required:
                problems.append((spec.env, f"is required; expected {spec.expects}"))
            continue
        try:
            values[f.name] = spec.parse(raw)
        except ValueError as exc:
            detail = f" ({exc})" if str(exc) else ""
            got = f"a secret of {len(raw)} characters" if spec.secret else repr(raw)
            problems.append((spec.env, f"expected {spec.expects}, got {got}{detail}"))
    if problems:
        raise ConfigError(problems)
    return cls(**values)


def exit_on_config_error(error: ConfigError) -> None:
    """Prints one line per bad variable to stderr and exits with status 2."""
    for line in error.lines():
        print(line, file=sys.stderr)
    raise SystemExit(2)


# --- parsers: each raises ValueError with no message, or a short reason ------------------


def _int(raw: str) -> int:
    try:
        return int(raw.strip())
    except ValueError:
        raise ValueError from None  # "expected ..." says it all; int()'s message adds noise


def parse_port(raw: str) -> int:
    """A TCP port 0-65535 (0 lets the OS choose)."""
    value = _int(raw)
    if not 0 <= value <= 65535:
        raise ValueError("out of range")
    return value


def parse_positive_int(raw: str) -> int:
    """An integer greater than zero."""
    value = _int(raw)
    if value <= 0:
        raise ValueError("must be > 0")
    return value


def parse_non_negative_int(raw: str) -> int:
    """An integer zero or greater."""
    value = _int(raw)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def parse_fraction(raw: str) -> float:
    """A share or probability from 0 to 1."""
    try:
        value = float(raw.strip())
    except ValueError:
        raise ValueError from None
    if not 0.0 <= value <= 1.0:
        raise ValueError("must be 0..1")
    return value


def parse_bool(raw: str) -> bool:
    """true/false, 1/0, yes/no, on/off (any case)."""
    lowered = raw.strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError


def parse_choice(*choices: str) -> Callable[[str], str]:
    """A parser accepting exactly one of `choices` (any case)."""

    def parse(raw: str) -> str:
        lowered = raw.strip().lower()
        if lowered not in choices:
            raise ValueError
        return lowered

    return parse


def parse_log_level(raw: str) -> str:
    """One of debug, info, warning, error."""
    lowered = raw.strip().lower()
    if lowered not in {"debug", "info", "warning", "error"}:
        raise ValueError
    return lowered


def parse_postgres_url(raw: str) -> str:
    """A postgresql:// URL (the asyncpg form; the SQLAlchemy driver suffix is added by us)."""
    if not raw.startswith(("postgresql://", "postgres://")):
        raise ValueError("must start with postgresql://")
    return raw


def parse_region_databases(raw: str) -> dict[str, str]:
    """`region=postgresql://…[;region=postgresql://…]` -> {region: url}, the first the home."""
    found: dict[str, str] = {}
    for entry in filter(None, (part.strip() for part in raw.split(";"))):
        region, sep, url = entry.partition("=")
        region = region.strip()
        if not sep or not region:
            raise ValueError("expected region=postgresql://… entries separated by ';'")
        if region in found:
            raise ValueError(f"region {region!r} is given twice")
        found[region] = parse_postgres_url(url.strip())
    if not found:
        raise ValueError("names no region")
    return found


def parse_redis_url(raw: str) -> str:
    """A redis:// or rediss:// or unix:// URL."""
    if not raw.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    return raw


def parse_address(raw: str) -> str:
    """host:port."""
    host, sep, port = raw.rpartition(":")
    if not sep or not host:
        raise ValueError("missing host or port")
    parse_port(port)
    return raw


def parse_secret_file(raw: str) -> str:
    """The contents of the file at path `raw` (a mounted Secret), surrounding whitespace
    removed; the error names the path, never the contents."""
    try:
        value = Path(raw).expanduser().read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read it: {type(exc).__name__}") from None
    if not value:
        raise ValueError("the file is empty")
    return value


def parse_path(raw: str) -> Path:
    """A filesystem path."""
    return Path(raw).expanduser()


# --- the settings every service shares --------------------------------------------------

DEFAULT_PORTS: Final[Mapping[str, int]] = {
    "pricing": 50051,
    "metering": 50052,
    "ledger": 50053,
    "notifier": 50054,
    "accounts": 50055,
}
"""Where each service listens unless TALLY_<SERVICE>_PORT says otherwise."""


@dataclass(frozen=True, slots=True)
class KitConfig:
    """Settings every Tally process reads: infrastructure, logging, shutdown."""

    database_url: str | None = setting(
        "TALLY_DATABASE_URL", parse_postgres_url, "a postgresql:// URL", default=None
    )
    region_databases: Mapping[str, str] | None = setting(
        "TALLY_REGION_DATABASES", parse_region_databases,
        "region=postgresql://…[;region=postgresql://…], the home region first (data "
        "residency: one database per region, tally.kit.regions)", default=None, secret=True)
    redis_url: str | None = setting(
        "TALLY_REDIS_URL", parse_redis_url, "a redis:// URL", default=None
    )
    data_dir: Path = setting(  # noqa: RUF009 - `setting` returns a field(); Path is immutable
        "TALLY_DATA_DIR", parse_path, "a directory path", default=Path(".tally")
    )
    host: str = setting("TALLY_HOST", str, "an interface address", default="127.0.0.1")
    log_level: str = setting(
        "TALLY_LOG_LEVEL", parse_log_level, "debug, info, warning or error", default="info"
    )
    migrate_on_start: bool = setting(
        "TALLY_MIGRATE_ON_START", parse_bool, "true or false", default=True
    )
    shutdown_grace_seconds: int = setting(
        "TALLY_SHUTDOWN_GRACE_SECONDS",
        parse_positive_int,
        "a whole number of seconds > 0",
        default=10,
    )
    shutdown_drain_delay_ms: int = setting(
        "TALLY_SHUTDOWN_DRAIN_DELAY_MS",
        parse_non_negative_int,
        "milliseconds >= 0 to stay up NOT_SERVING before refusing calls",
        default=0,
    )
    db_pool_size: int = setting(
        "TALLY_DB_POOL_SIZE", parse_positive_int, "an integer > 0", default=8
    )
    health_port: int = setting(
        "TALLY_HEALTH_PORT", parse_port,
        "a port 0-65535 serving only gRPC health in plaintext beside an mTLS port, for probes "
        "that cannot speak TLS (0 = none)", default=0
    )
    metrics_port: int = setting(
        "TALLY_METRICS_PORT", parse_port, "a port 0-65535 (0 = no /metrics endpoint)",
        default=0
    )
    pricing_port: int = setting(
        "TALLY_PRICING_PORT", parse_port, "a port 0-65535", default=DEFAULT_PORTS["pricing"]
    )
    metering_port: int = setting(
        "TALLY_METERING_PORT", parse_port, "a port 0-65535", default=DEFAULT_PORTS["metering"]
    )
    ledger_port: int = setting(
        "TALLY_LEDGER_PORT", parse_port, "a port 0-65535", default=DEFAULT_PORTS["ledger"]
    )
    notifier_port: int = setting(
        "TALLY_NOTIFIER_PORT", parse_port, "a port 0-65535", default=DEFAULT_PORTS["notifier"]
    )
    accounts_port: int = setting(
        "TALLY_ACCOUNTS_PORT", parse_port, "a port 0-65535", default=DEFAULT_PORTS["accounts"]
    )
    # Where a peer is reached when that is not TALLY_HOST:<its port> (in Kubernetes a service
    # binds 0.0.0.0 and reaches its peers through their Services' DNS names).
    pricing_address: str | None = setting(
        "TALLY_PRICING_ADDRESS", parse_address, "host:port", default=None)
    metering_address: str | None = setting(
        "TALLY_METERING_ADDRESS", parse_address, "host:port", default=None)
    ledger_address: str | None = setting(
        "TALLY_LEDGER_ADDRESS", parse_address, "host:port", default=None)
    notifier_address: str | None = setting(
        "TALLY_NOTIFIER_ADDRESS", parse_address, "host:port", default=None)
    accounts_address: str | None = setting(
        "TALLY_ACCOUNTS_ADDRESS", parse_address, "host:port", default=None)

    def port_of(self, service: str) -> int:
        """The configured port of `service` (pricing, metering, ledger or notifier)."""
        port: int = getattr(self, f"{service}_port")
        return port

    def address_of(self, service: str) -> str:
        """host:port where `service` is reached: TALLY_<SERVICE>_ADDRESS, else TALLY_HOST and
        the service's port."""
        explicit: str | None = getattr(self, f"{service}_address")
        return explicit or f"{self.host}:{self.port_of(service)}"


def load_kit_config(environ: Mapping[str, str] | None = None) -> KitConfig:
    """Reads KitConfig from the environment (raises ConfigError)."""
    return load(KitConfig, environ)
