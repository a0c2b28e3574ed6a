"""One logger for every service: structlog, JSON lines, with the current trace and span ids.

Secrets never reach a log line: keys that name credentials are redacted by a processor, so a
careless `log.info("x", api_key=...)` still prints `"[redacted]"`, and a password inside a URL
(a DSN in an exception message, say) is cut out of any value, tracebacks included.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any, Final, TextIO

import structlog
from opentelemetry import trace

_SECRET_KEYS: Final = frozenset(
    {"api_key", "secret", "password", "token", "authorization", "signature", "webhook_secret",
     "kek", "client_secret", "private_key"}
)
# Secrets recognised by their shape wherever they appear in a value (an API key in an error
# message, a bearer token in a header dump, a webhook secret in a URL).
_SECRET_VALUES: Final = re.compile(
    r"\b(tly_[a-z0-9-]+_|whsec_)[A-Za-z0-9_-]{8,}|(\bBearer\s+)[A-Za-z0-9._~+/=-]{8,}")


def _add_trace_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    ctx = trace.get_current_span().get_span_context()
    if ctx.is_valid:
        event["trace_id"] = format(ctx.trace_id, "032x")
        event["span_id"] = format(ctx.span_id, "016x")
    else:
        event.setdefault("trace_id", None)
        event.setdefault("span_id", None)
    return event


_URL_PASSWORD: Final = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@", re.IGNORECASE)


def _redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if key.lower() in _SECRET_KEYS:
            event[key] = "[redacted]"
        elif isinstance(value, str):
            if "://" in value:
                value = event[key] = _URL_PASSWORD.sub(r"\1[redacted]@", value)
            if "tly_" in value or "whsec_" in value or "Bearer" in value:
                event[key] = _SECRET_VALUES.sub(
                    lambda m: (m.group(1) or m.group(2)) + "[redacted]", value)
    return event


def configure_logging(service: str, level: str = "info", stream: TextIO | None = None) -> None:
    """Configures structlog, and stdlib logging (libraries), to print the same JSON lines."""
    numeric = logging.getLevelName(level.upper())
    out = stream or sys.stderr
    enrich: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_trace_ids,
    ]
    render: list[Any] = [
        structlog.processors.format_exc_info,
        _redact_secrets,  # after the traceback is text, so it is scrubbed too
        structlog.processors.JSONRenderer(),
    ]
    structlog.configure(
        processors=[*enrich, *render],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    structlog.contextvars.bind_contextvars(service=service)
    handler = logging.StreamHandler(out)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, *enrich],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render]))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))


def get_logger(name: str | None = None) -> Any:
    """A structlog logger; `name` becomes the `component` field."""
    # Lazy: a module-level logger must pick up the configuration made later in main().
    return structlog.get_logger(component=name) if name else structlog.get_logger()
