"""Log lines: every one is JSON with trace and span ids — ours and the libraries' — and no
credential reaches one, whether passed as a field, inside a URL, or in a traceback."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest
import structlog
from opentelemetry.sdk.trace import TracerProvider

from tally.kit.log import configure_logging, get_logger

SECRETS = ("hunter2", "sk-live-51Habc", "whsec_topsecret")


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    handlers = logging.getLogger().handlers[:]
    yield
    structlog.reset_defaults()
    logging.getLogger().handlers[:] = handlers


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]


def test_every_line_is_json_with_trace_ids_and_no_credentials() -> None:
    out = io.StringIO()
    configure_logging("test", "debug", stream=out)
    log = get_logger("test.logs")
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("rpc") as span:
        log.info("connecting", api_key="sk-live-51Habc", webhook_secret="whsec_topsecret",
                 target="postgresql://tally:hunter2@db.internal:5432/tally")
        try:
            raise ConnectionError("could not connect to postgresql://tally:hunter2@db:5432/x")
        except ConnectionError:
            log.exception("connect_failed")
        logging.getLogger("asyncpg.pool").warning(
            'pool "main" lost redis://:hunter2@cache:6379/0')
    log.info("outside_any_span")
    found = lines(out)
    assert len(found) == 4
    trace_id = format(span.get_span_context().trace_id, "032x")
    assert [line["trace_id"] for line in found[:3]] == [trace_id] * 3
    assert all(line["span_id"] for line in found[:3])
    assert found[3]["trace_id"] is None and "span_id" in found[3]
    assert found[0]["api_key"] == "[redacted]"
    assert "db.internal:5432" in str(found[0]["target"])
    assert "Traceback" in str(found[1]["exception"])
    assert found[2]["logger"] == "asyncpg.pool" and found[2]["level"] == "warning"
    text = out.getvalue()
    for secret in SECRETS:
        assert secret not in text


def test_library_lines_below_warning_are_dropped() -> None:
    out = io.StringIO()
    configure_logging("test", "debug", stream=out)
    logging.getLogger("grpc").info("noise")
    logging.getLogger("grpc").warning("kept")
    assert [line["event"] for line in lines(out)] == ["kept"]


def test_api_keys_bearer_tokens_and_webhook_secrets_are_redacted_wherever_they_appear() -> None:
    out = io.StringIO()
    configure_logging("test", "debug", stream=out)
    key = "tly_prod_AbCdEfGhIjKlMnOpQrStUvWxYz012345"
    token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhbGljZSJ9.c2lnbmF0dXJl"
    get_logger("test.logs").warning("refused", detail=f"unknown API key {key}",
                                    headers=f"authorization: Bearer {token}",
                                    url="https://hooks.example/x?s=whsec_topsecretvalue")
    text = out.getvalue()
    assert key not in text and token not in text and "whsec_topsecretvalue" not in text
    (line,) = lines(out)
    assert line["detail"] == "unknown API key tly_prod_[redacted]"
    assert line["headers"] == "authorization: Bearer [redacted]"
