"""The Envoy and Istio examples under k8s/examples speak what metering answers: the domain it
serves, only descriptor keys it knows, an org on every descriptor, its gRPC port; and the
Kubernetes objects are valid against the API schema scripts/check_k8s.py uses."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import yaml

from services.metering.spend.ratelimit import DOMAIN, KEYS
from tally.kit.config import DEFAULT_PORTS

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLES = ROOT / "k8s" / "examples"


def _check_k8s() -> Any:
    spec = importlib.util.spec_from_file_location("check_k8s", ROOT / "scripts" / "check_k8s.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _walk(node: Any) -> list[dict[str, Any]]:
    """Every mapping in a YAML tree."""
    found: list[dict[str, Any]] = []
    if isinstance(node, dict):
        found.append(node)
        for value in node.values():
            found.extend(_walk(value))
    elif isinstance(node, list):
        for value in node:
            found.extend(_walk(value))
    return found


def _assert_speaks_tally(config: Any) -> None:
    filters = [m for m in _walk(config) if m.get("name") == "envoy.filters.http.ratelimit"]
    assert filters and all(f["typed_config"]["domain"] == DOMAIN for f in filters)
    limits = [m["rate_limits"] for m in _walk(config) if "rate_limits" in m]
    assert limits
    for descriptors in limits:
        for descriptor in descriptors:
            actions = [a["request_headers"] for a in descriptor["actions"]]
            keys = [a["descriptor_key"] for a in actions]
            assert set(keys) <= set(KEYS), keys
            org = next(a for a in actions if a["descriptor_key"] == "org_id")
            assert not org.get("skip_if_absent")  # no org, no descriptor: never a bare one


def test_the_envoy_example() -> None:
    docs = list(yaml.safe_load_all((EXAMPLES / "envoy-ratelimit.yaml").read_text()))
    check = _check_k8s()
    assert [e for doc in docs for e in check.schema_errors(doc)] == []
    config_map = next(d for d in docs if d["kind"] == "ConfigMap")
    envoy = yaml.safe_load(config_map["data"]["envoy.yaml"])
    _assert_speaks_tally(envoy)
    [metering] = [c for c in envoy["static_resources"]["clusters"]
                  if c["name"] == "tally_metering"]
    address = _walk(metering["load_assignment"])
    assert any(m.get("port_value") == DEFAULT_PORTS["metering"] for m in address)
    assert "http2_protocol_options" in str(metering)  # gRPC needs HTTP/2


def test_the_istio_example() -> None:
    docs = list(yaml.safe_load_all((EXAMPLES / "istio-ratelimit.yaml").read_text()))
    assert {d["kind"] for d in docs} == {"EnvoyFilter"}
    _assert_speaks_tally(docs)
    clusters = [m["cluster_name"] for m in _walk(docs) if "cluster_name" in m]
    assert clusters == [f"outbound|{DEFAULT_PORTS['metering']}||metering.tally.svc.cluster.local"]
