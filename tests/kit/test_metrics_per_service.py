"""Each service's /metrics exports its own Tally metric families and not the others', and
`tally up` gives each service its own metrics port."""

from __future__ import annotations

from prometheus_client import generate_latest

from tally.cli.suite import SERVICES, metrics_port_of
from tally.kit import metrics


def _families(service: str) -> set[str]:
    text = generate_latest(metrics.registry_of(service)).decode()
    return {line.split()[2].removesuffix("_created").removesuffix("_total")
            for line in text.splitlines() if line.startswith("# TYPE tally_")}


def test_each_service_exports_only_its_own_metric_families() -> None:
    exported = {service: _families(service) for service in SERVICES}
    assert "tally_ledger_credits_debited_micros" in exported["ledger"]
    assert "tally_usage_events" in exported["metering"]
    assert "tally_notifier_deliveries" in exported["notifier"]
    for service, families in exported.items():
        assert "tally_rpc_requests" in families, service
    assert not any(f.startswith(("tally_ledger_", "tally_usage_", "tally_notifier_"))
                   for f in exported["pricing"])
    assert not any(f.startswith("tally_ledger_") for f in exported["notifier"])
    assert not any(f.startswith("tally_notifier_") for f in exported["ledger"])
    assert "tally_authorize_decisions" not in exported["ledger"]


def test_tally_up_gives_every_service_its_own_metrics_port() -> None:
    ports = [metrics_port_of(9464, service) for service in SERVICES]
    assert len(set(ports)) == len(SERVICES)
    assert ports[0] == 9464
    assert all(metrics_port_of(0, service) == 0 for service in SERVICES)
