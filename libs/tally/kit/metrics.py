"""Prometheus metrics, one registry per process: the golden signals of every RPC (recorded by
the kit server's interceptor) and the domain counters the services declare here, so every
name and label set is in one place.

Served over HTTP at /metrics on TALLY_METRICS_PORT when it is set (`serve`); in tests,
`sample` reads a value straight from the registry.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, Metric, start_http_server

_LATENCY_BUCKETS: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                           1.0, 2.5, 5.0, 10.0)

# -- golden signals (kit server) ------------------------------------------------------------
RPC_REQUESTS: Final = Counter(
    "tally_rpc_requests", "RPCs served, by method and final gRPC status code",
    ["service", "method", "code"])
RPC_REFUSED_SHUTTING_DOWN: Final = Counter(
    "tally_rpc_refused_shutting_down", "Calls refused UNAVAILABLE because the server was "
    "stopping (after the drain delay; each would otherwise have been cut CANCELLED)",
    ["service", "method"])
RPC_DURATION: Final = Histogram(
    "tally_rpc_duration_seconds", "Time to serve an RPC (streams: their whole life)",
    ["service", "method"], buckets=_LATENCY_BUCKETS)

# -- metering ---------------------------------------------------------------------------------
USAGE_EVENTS: Final = Counter(
    "tally_usage_events", "Usage events answered, by outcome (ACCEPTED, DUPLICATE, REJECTED)",
    ["status"])
AUTHORIZE_DECISIONS: Final = Counter(
    "tally_authorize_decisions", "Authorize answers, by decision and deny reason",
    ["decision", "reason"])
LIMITER_BACKEND_ERRORS: Final = Counter(
    "tally_limiter_backend_errors", "Limiter round trips that failed (the outage policy "
    "answered)", ["backend"])
LIMITER_DEGRADED_DECISIONS: Final = Counter(
    "tally_limiter_degraded_decisions", "Quota decisions made by the outage policy",
    ["backend", "policy"])

GROUP_COMMIT_SIZE: Final = Histogram(
    "tally_group_commit_size", "Requests applied together in one transaction, by group commit "
    "(tally.kit.group_commit)", ["group"], buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32, 64, 128))
USAGE_ROLLUP_LAG: Final = Gauge(
    "tally_metering_rollup_lag_seconds", "Age of the oldest committed usage batch not yet in "
    "the roll-ups (0 when they are caught up)")
USAGE_ROLLUP_BATCHES: Final = Histogram(
    "tally_metering_rollup_batches", "Committed usage batches rolled up per transaction",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256))
# -- ledger -----------------------------------------------------------------------------------
CREDITS_DEBITED: Final = Counter(
    "tally_ledger_credits_debited_micros", "Usage debited from org credit, micro-credits")
ARREARS_RECORDED: Final = Counter(
    "tally_ledger_arrears_micros", "Usage beyond available credit recorded as arrears, "
    "micro-credits")
LEDGER_BATCH_ITEMS: Final = Histogram(
    "tally_ledger_batch_items", "Items per PostUsageBatch",
    buckets=(1, 10, 50, 100, 250, 500, 1000, 2000, 5000))
LEDGER_COMMIT_SECONDS: Final = Histogram(
    "tally_ledger_batch_commit_seconds", "Time to apply one PostUsageBatch transaction",
    buckets=_LATENCY_BUCKETS)


PAYMENT_WEBHOOKS: Final = Counter(
    "tally_ledger_payment_webhooks", "Payment webhooks received, by provider and outcome "
    "(CREDITED, ALREADY_PAID, ATTEMPT_FAILED, FAILED, CANCELED, IGNORED, MISMATCH, DUPLICATE, "
    "REFUSED)", ["provider", "outcome"])
TOP_UPS: Final = Counter(
    "tally_ledger_top_ups", "Automatic top-up decisions, by decision (START, IN_FLIGHT, "
    "DAILY_LIMIT, NOT_BELOW, DISABLED)", ["decision"])
# -- notifier ---------------------------------------------------------------------------------
WEBHOOK_DELIVERIES: Final = Counter(
    "tally_notifier_deliveries", "Delivery attempts, by channel and outcome (delivered, "
    "retrying, dead_lettered)", ["channel", "outcome"])
NOTIFICATIONS: Final = Counter(
    "tally_notifier_notifications", "Notifications created, by type", ["type"])

# -- outboxes (kit.outbox) --------------------------------------------------------------------
OUTBOX_SEALED: Final = Counter(
    "tally_outbox_sealed_events", "Outbox events made visible to consumers", ["table"])
OUTBOX_SEAL_LAG: Final = Gauge(
    "tally_outbox_seal_lag_seconds", "Age of the oldest event in the last sealed batch: how "
    "late consumers see events", ["table"])


_SHARED: Final = (RPC_REQUESTS, RPC_REFUSED_SHUTTING_DOWN, RPC_DURATION)
_OUTBOX: Final = (OUTBOX_SEALED, OUTBOX_SEAL_LAG)
FAMILIES_OF: Final[dict[str, tuple[Counter | Gauge | Histogram, ...]]] = {
    "pricing": _SHARED,
    "metering": (*_SHARED, *_OUTBOX, USAGE_EVENTS, AUTHORIZE_DECISIONS, LIMITER_BACKEND_ERRORS,
                 LIMITER_DEGRADED_DECISIONS, GROUP_COMMIT_SIZE),
    "ledger": (*_SHARED, *_OUTBOX, GROUP_COMMIT_SIZE, CREDITS_DEBITED, ARREARS_RECORDED,
               LEDGER_BATCH_ITEMS, LEDGER_COMMIT_SECONDS, PAYMENT_WEBHOOKS, TOP_UPS),
    "notifier": (*_SHARED, WEBHOOK_DELIVERIES, NOTIFICATIONS),
}
"""The Tally metric families each service records; its /metrics exports only these (every
family is declared in this one module, so every process would otherwise export every
service's families, most of them forever zero)."""


class _ServiceView:
    """The process registry as one service exports it: its own Tally families, and every
    family that is not Tally's (process_*, python_*)."""

    def __init__(self, service: str) -> None:
        # the family name: a counter's samples add _total, the family does not
        self._tally = {metric._name for metric in FAMILIES_OF[service]}

    def collect(self) -> Iterator[Metric]:
        for family in REGISTRY.collect():
            if not family.name.startswith("tally_") or family.name in self._tally:
                yield family


def registry_of(service: str) -> Any:
    """What /metrics exports for `service` (the whole registry for a service not listed)."""
    return _ServiceView(service) if service in FAMILIES_OF else REGISTRY


def serve(port: int, host: str, service: str = "") -> int:
    """Serves /metrics over HTTP on a daemon thread for the life of the process (on the
    interface gRPC binds, TALLY_HOST): `service`'s own families only. Returns the bound port
    (the kernel's choice for port 0)."""
    httpd, _ = start_http_server(port, addr=host, registry=registry_of(service))
    bound: int = httpd.server_port
    return bound


def sample(name: str, labels: dict[str, str] | None = None) -> float:
    """The current value of one series (0 when it has never been recorded)."""
    value = REGISTRY.get_sample_value(name, labels or {})
    return value or 0.0
