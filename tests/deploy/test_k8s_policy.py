"""What the Kubernetes manifests must guarantee, checked on what `kubectl kustomize` renders.

Every overlay under k8s/overlays is rendered (with scripts/check_k8s.py's functions) and held
to the rules the services depend on: probes against the kit's grpc.health.v1 service on the port
the service's own config resolves to, a shutdown that fits in the pod's grace period, the
restricted security context, requests and limits, a PodDisruptionBudget and a NetworkPolicy
admitting exactly the services that call each one (read from the composition roots), secrets
referenced and never committed, metering's quota counters shared whenever it can scale, and
the production overlay meshed and redundant. Settings are parsed by the services' own config
classes, so a value a service would reject fails here, not in a crash loop.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import re
from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from services.accounts.server import AccountsConfig
from services.ledger.payments.stripe_provider import StripeProvider
from services.ledger.server import LedgerConfig, payment_provider
from services.metering.server import MeteringConfig
from services.portal.config import PortalConfig
from services.pricing.server import PricingConfig
from tally.cli.main import app as cli
from tally.kit import tls
from tally.kit.auth import AuthConfig
from tally.kit.config import DEFAULT_PORTS, KitConfig, load, load_kit_config

ROOT = Path(__file__).resolve().parents[2]
TALLY_SERVICES = tuple(DEFAULT_PORTS)
USER_ID = 10001
# Stand-ins for the Secret values a cluster provides, so the settings parse as the service
# would parse them.
SECRET_STAND_INS = {
    ("tally-database", "url"): "postgresql://tally@postgres.invalid:5432/tally",
    ("tally-redis", "url"): "redis://redis.invalid:6379/0",
    ("tally-payments", "webhook-secrets"): "whsec_stand_in_current,whsec_stand_in_previous",
    ("tally-payments", "stripe-secret-key"): "sk_live_stand_in_0000000000000000",
    ("tally-portal-oidc", "client-secret"): "portal-client-secret-stand-in",
}
WEB = "portal"
"""The HTTP service: a client of the five (not in DEFAULT_PORTS), probed over HTTP."""
CLIENT_LABEL = {"tally.dev/client": "true"}

Document = dict[str, Any]


def _load_checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_k8s", ROOT / "scripts" / "check_k8s.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check_k8s = _load_checker()
TARGETS: dict[str, Path] = check_k8s.targets()
OVERLAYS = [name for name in TARGETS if name != "base"]


def rendered_dev_secret_names() -> set[str]:
    """The Secrets the dev overlay's Deployments mount as volumes."""
    return {volume["secret"]["secretName"]
            for doc in check_k8s.render(TARGETS["dev"]) if doc.get("kind") == "Deployment"
            for volume in pod_spec(doc).get("volumes", []) if "secret" in volume}


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Document]]:
    """Every kustomization's objects, rendered once."""
    return {name: check_k8s.render(path) for name, path in TARGETS.items()}


# --- reading the rendered objects ---------------------------------------------------------


def of_kind(docs: list[Document], kind: str) -> list[Document]:
    return [doc for doc in docs if doc["kind"] == kind]


def named(docs: list[Document], kind: str, name: str) -> Document:
    found = [doc for doc in of_kind(docs, kind) if doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def pod_spec(workload: Document) -> Document:
    spec: Document = workload["spec"]["template"]["spec"]
    return spec


def pod_labels(workload: Document) -> dict[str, str]:
    labels: dict[str, str] = workload["spec"]["template"]["metadata"].get("labels", {})
    return labels


def containers(workload: Document) -> list[Document]:
    spec = pod_spec(workload)
    return [*spec.get("initContainers", []), *spec["containers"]]


def selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    """Whether a LabelSelector matches `labels` (matchLabels and matchExpressions)."""
    if any(labels.get(key) != value for key, value in selector.get("matchLabels", {}).items()):
        return False
    for expression in selector.get("matchExpressions", []):
        key, operator, values = expression["key"], expression["operator"], \
            expression.get("values", [])
        matched = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not matched:
            return False
    return True


def workloads(docs: list[Document]) -> list[Document]:
    return of_kind(docs, "Deployment") + of_kind(docs, "Job")


def service_of(deployment: Document) -> str | None:
    """The Tally service a Deployment runs (from `python -m services.<name>`), if any."""
    args = deployment_container(deployment).get("args", [])
    match = re.fullmatch(r"services\.(\w+)", args[0]) if args else None
    return match.group(1) if match else None


def deployment_container(workload: Document) -> Document:
    main: Document = pod_spec(workload)["containers"][0]
    return main


def tally_deployments(docs: list[Document]) -> dict[str, Document]:
    """The five gRPC services' Deployments (the portal is `portal_deployment`)."""
    found = {service_of(d): d for d in of_kind(docs, "Deployment")
             if service_of(d) and service_of(d) != WEB}
    assert sorted(found) == sorted(TALLY_SERVICES), f"Deployments for {sorted(found)}"
    return {name: deployment for name, deployment in found.items() if name}


def portal_deployment(docs: list[Document]) -> Document:
    (found,) = [d for d in of_kind(docs, "Deployment") if service_of(d) == WEB]
    return found


def environment(container: Document, docs: list[Document]) -> dict[str, str]:
    """The container's environment as the process sees it (Secrets by their stand-ins)."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]
        env.update(named(docs, "ConfigMap", ref["name"]).get("data", {}))
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
            continue
        ref = var["valueFrom"]
        if "secretKeyRef" in ref:
            key = (ref["secretKeyRef"]["name"], ref["secretKeyRef"]["key"])
            assert key in SECRET_STAND_INS, f"{var['name']} reads an unknown Secret {key}"
            env[var["name"]] = SECRET_STAND_INS[key]
        else:
            env[var["name"]] = "from-the-downward-api"
    return env


def kit_config(deployment: Document, docs: list[Document]) -> KitConfig:
    return load_kit_config(environment(deployment_container(deployment), docs))


def hpa_for(docs: list[Document], deployment: Document) -> Document | None:
    for hpa in of_kind(docs, "HorizontalPodAutoscaler"):
        target = hpa["spec"]["scaleTargetRef"]
        if target["kind"] == "Deployment" and target["name"] == deployment["metadata"]["name"]:
            return hpa
    return None


def replica_range(docs: list[Document], deployment: Document) -> tuple[int, int]:
    """The fewest and most replicas the Deployment can run (its HPA's range, if it has one)."""
    hpa = hpa_for(docs, deployment)
    if hpa is not None:
        return hpa["spec"].get("minReplicas", 1), hpa["spec"]["maxReplicas"]
    replicas = deployment["spec"].get("replicas", 1)
    return replicas, replicas


def effective(container_ctx: Document, pod_ctx: Document, field: str) -> Any:
    """A security setting as it applies: the container's, else the pod's."""
    return container_ctx.get(field, pod_ctx.get(field))


def health_service_name(service: str) -> str:
    """The gRPC service the kit registers with health for `service` (from its stubs)."""
    stubs = importlib.import_module(f"tally.{service}.v1.{service}_pb2")
    names = [s.full_name for s in stubs.DESCRIPTOR.services_by_name.values()]
    assert len(names) == 1
    return names[0]


def callees(service: str) -> set[str]:
    """The services `service` opens channels to, read from its composition root, plus
    accounts: the kit's guard in every other server follows its credentials feed and ships
    its audit trail there."""
    source = (ROOT / "services" / service / "server.py").read_text()
    found = set(re.findall(r"address_of\(\s*[\"'](\w+)[\"']\s*\)", source))
    return found | ({"accounts"} if service != "accounts" else set())


def callers(service: str) -> set[str]:
    return {other for other in TALLY_SERVICES if service in callees(other)}


def setting_names(*config_classes: type) -> set[str]:
    """Every environment variable the config classes read."""
    return {meta.env for cls in config_classes for f in dataclasses.fields(cls)
            for meta in f.metadata.values() if hasattr(meta, "env")}


def quantity(value: str | int | float) -> float:
    """A Kubernetes resource quantity (100m, 2, 512Mi, 1Gi, 1G) as a number."""
    text = str(value)
    suffixes = {"m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
                "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    match = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", text)
    assert match, f"not a quantity: {text!r}"
    number, suffix = match.groups()
    return float(number) * (suffixes[suffix] if suffix else 1)


per_overlay = pytest.mark.parametrize("overlay", OVERLAYS)


# --- the tests ----------------------------------------------------------------------------


def test_the_expected_overlays_exist() -> None:
    assert {"dev", "prod"} <= set(OVERLAYS)


@pytest.mark.parametrize("target", list(TARGETS))
def test_every_object_is_valid_for_the_pinned_kubernetes_version(
        rendered: dict[str, list[Document]], target: str) -> None:
    docs = rendered[target]
    assert docs
    errors = [error for doc in docs for error in check_k8s.schema_errors(doc)]
    assert errors == []


@per_overlay
def test_every_container_has_liveness_and_readiness_probes(
        rendered: dict[str, list[Document]], overlay: str) -> None:
    for deployment in of_kind(rendered[overlay], "Deployment"):
        for container in pod_spec(deployment)["containers"]:
            where = f"{overlay}: Deployment/{deployment['metadata']['name']}/{container['name']}"
            assert container.get("livenessProbe"), f"{where} has no livenessProbe"
            assert container.get("readinessProbe"), f"{where} has no readinessProbe"


@per_overlay
def test_services_are_probed_over_grpc_health_on_their_configured_port(
        rendered: dict[str, list[Document]], overlay: str) -> None:
    docs = rendered[overlay]
    for service, deployment in tally_deployments(docs).items():
        container = deployment_container(deployment)
        config = kit_config(deployment, docs)
        port = config.port_of(service)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["grpc"] == port, f"{service} listens on {port}, declares {ports}"
        # behind mTLS the kubelet (which cannot speak TLS) probes the plaintext health port
        probed = config.health_port or port
        if config.health_port:
            assert ports["health"] == config.health_port, f"{service} declares {ports}"
        for kind in ("startupProbe", "livenessProbe", "readinessProbe"):
            probe = container[kind]
            assert probe.get("grpc", {}).get("port") == probed, f"{service} {kind}: {probe}"
        # Readiness follows the service's own health entry, which turns NOT_SERVING first
        # thing on SIGTERM; liveness asks about the server as a whole.
        assert container["readinessProbe"]["grpc"]["service"] == health_service_name(service)
        assert container["livenessProbe"]["grpc"].get("service", "") == ""


@per_overlay
def test_without_a_mesh_every_service_serves_mtls_from_its_own_certificate_secret(
        rendered: dict[str, list[Document]], overlay: str) -> None:
    docs = rendered[overlay]
    for service, deployment in tally_deployments(docs).items():
        container = deployment_container(deployment)
        env = environment(container, docs)
        if env.get("TALLY_AUTH_MESH_IDENTITY") == "true":
            continue  # the mesh proves who calls (prod)
        mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod_spec(deployment).get("volumes", [])}
        for name in ("TALLY_TLS_CERT", "TALLY_TLS_KEY", "TALLY_TLS_CA", "TALLY_TLS_CLIENT_CA"):
            path = env.get(name, "")
            assert path, f"{overlay}: {service} has no mesh and no {name}"
            volume = volumes[mounts[str(Path(path).parent)]]
            assert volume["secret"]["secretName"] == f"tally-{service}-tls", (service, name)


@per_overlay
def test_each_service_is_reachable_on_a_named_grpc_port(
        rendered: dict[str, list[Document]], overlay: str) -> None:
    docs = rendered[overlay]
    for service, deployment in tally_deployments(docs).items():
        svc = named(docs, "Service", service)
        assert selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(deployment))
        (port,) = [p for p in svc["spec"]["ports"] if p["name"] == "grpc"]
        assert port["appProtocol"] == "grpc"
        assert port["port"] == kit_config(deployment, docs).port_of(service)
        assert port["targetPort"] in ("grpc", port["port"])


@per_overlay
def test_shutdown_drains_within_the_termination_grace_period(
        rendered: dict[str, list[Document]], overlay: str) -> None:
    docs = rendered[overlay]
    for service, deployment in tally_deployments(docs).items():
        config = kit_config(deployment, docs)
        drain_s = config.shutdown_drain_delay_ms / 1000 + config.shutdown_grace_seconds
        grace_s = pod_spec(deployment).get("terminationGracePeriodSeconds", 30)
        assert drain_s < grace_s, f"{service}: drain {drain_s}s >= grace period {grace_s}s"
        # A stopping pod reports NOT_SERVING: its liveness probe must not kill it mid-drain.
        liveness = deployment_container(deployment)["livenessProbe"]
        tolerated_s = liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3)
        assert tolerated_s > drain_s, f"{service}: liveness kills after {tolerated_s}s"


@per_overlay
def test_settings_parse_and_migrations_are_left_to_the_job(
        rendered: dict[str, list[Document]], overlay: str) -> None:
    docs = rendered[overlay]
    known = setting_names(KitConfig, MeteringConfig, PricingConfig, LedgerConfig, AuthConfig,
                          AccountsConfig) | set(tls.SETTINGS)
    for service, deployment in tally_deployments(docs).items():
        env = environment(deployment_container(deployment), docs)
        unknown = {name for name in env if name.startswith("TALLY_")} - known
        assert not unknown, f"{service}: settings no service reads: {sorted(unknown)}"
        config = load_kit_config(env)
        assert config.migrate_on_start is False
        assert config.host == "0.0.0.0", "bind every interface, or the pod IP is unreachable"
        assert config.database_url == SECRET_STAND_INS[("tally-database", "url")]
        load(MeteringConfig, env)
        load(PricingConfig, env)
        load(LedgerConfig, env)
        load(AuthConfig, env)
    (job,) = of_kind(docs, "Job")
    assert deployment_container(job)["args"] == ["tally.cli.main", "migrate"]
    commands = {c.name or (c.callback.__name__ if c.callback else "")
                for c in cli.registered_commands}
    assert "migrate" in commands
    assert environment(deployment_container(job), docs)["TALLY_DATABASE_URL"]


@per_overlay
def test_containers_run_what_the_image_can_start(
        rendered: dict[str, list[Document]], overlay: str) -> None:
    for workload in workloads(rendered[overlay]):
        container = deployment_container(workload)
        if not container["image"].startswith("tally:"):
            continue
        assert container["image"].split(":", 1)[1] not in ("", "latest")
        module = container["args"][0]  # the image's entrypoint is `python -m`
        runnable = importlib.util.find_spec(f"{module}.__main__") if module.startswith(
            "services.") else importlib.util.find_spec(module)
        assert runnable is not None, f"python -m {module} would fail"


@per_overlay
def test_every_container_has_requests_and_limits(
        rendered: dict[str, list[Document]], overlay: str) -> None:
    for workload in workloads(rendered[overlay]):
        for container in containers(workload):
            where = f"{overlay}: {workload['metadata']['name']}/{container['name']}"
            resources = container.get("resources", {})
            for resource in ("cpu", "memory"):
                request = resources.get("requests", {}).get(resource)
                limit = resources.get("limits", {}).get(resource)
                assert request is not None and limit is not None, f"{where}: {resource}"
                assert quantity(request) <= quantity(limit), f"{where}: {resource}"


@per_overlay
def test_pods_run_non_root_on_a_read_only_root_filesystem(
        rendered: dict[str, list[Document]], overlay: str) -> None:
    for workload in workloads(rendered[overlay]):
        spec = pod_spec(workload)
        pod = spec.get("securityContext", {})
        assert not any(spec.get(f) for f in ("hostNetwork", "hostPID", "hostIPC"))
        assert spec.get("automountServiceAccountToken") is False
        assert spec.get("serviceAccountName"), "runs as the namespace's default account"
        for container in containers(workload):
            where = f"{overlay}: {workload['metadata']['name']}/{container['name']}"
            ctx = container.get("securityContext", {})
            assert effective(ctx, pod, "runAsNonRoot") is True, where
            assert effective(ctx, pod, "runAsUser") == USER_ID, where
            assert ctx.get("readOnlyRootFilesystem") is True, where
            assert ctx.get("allowPrivilegeEscalation") is False, where
            assert ctx.get("privileged", False) is False, where
            assert "ALL" in ctx.get("capabilities", {}).get("drop", []), where
            assert not ctx.get("capabilities", {}).get("add"), where
            assert effective(ctx, pod, "seccompProfile") == {"type": "RuntimeDefault"}, where
            if container["image"].startswith("tally:"):
                # A read-only root: Python's and the services' scratch space is /tmp.
                mounts = {m["mountPath"]: m["name"] for m in container.get("volumeMounts", [])}
                volumes = {v["name"]: v for v in spec.get("volumes", [])}
                assert "emptyDir" in volumes[mounts["/tmp"]], where
    for account in of_kind(rendered[overlay], "ServiceAccount"):
        assert account.get("automountServiceAccountToken") is False


@per_overlay
def test_every_deployment_has_a_disruption_budget_and_a_network_policy(
        rendered: dict[str, list[Document]], overlay: str) -> None:
    docs = rendered[overlay]
    for deployment in of_kind(docs, "Deployment"):
        labels, name = pod_labels(deployment), deployment["metadata"]["name"]
        budgets = [b for b in of_kind(docs, "PodDisruptionBudget")
                   if selects(b["spec"]["selector"], labels)]
        assert len(budgets) == 1, f"{overlay}: {name} has {len(budgets)} PodDisruptionBudgets"
        own = [p for p in of_kind(docs, "NetworkPolicy")
               if p["spec"]["podSelector"] and selects(p["spec"]["podSelector"], labels)]
        assert own, f"{overlay}: no NetworkPolicy selects {name}'s pods"
        assert all(p["spec"].get("ingress") for p in own)


@per_overlay
def test_ingress_is_denied_unless_a_policy_admits_it(
        rendered: dict[str, list[Document]], overlay: str) -> None:
    deny = [p for p in of_kind(rendered[overlay], "NetworkPolicy")
            if p["spec"]["podSelector"] == {} and "Ingress" in p["spec"]["policyTypes"]
            and not p["spec"].get("ingress")]
    assert deny, f"{overlay}: no default-deny ingress NetworkPolicy"


@per_overlay
def test_network_policies_admit_exactly_each_services_callers_and_clients(
        rendered: dict[str, list[Document]], overlay: str) -> None:
    docs = rendered[overlay]
    assert callees("metering") >= {"pricing", "ledger"}, "composition roots not understood"
    for service, deployment in tally_deployments(docs).items():
        container = deployment_container(deployment)
        grpc_port = {p["name"]: p["containerPort"] for p in container["ports"]}["grpc"]
        rules = [rule for policy in of_kind(docs, "NetworkPolicy")
                 if policy["spec"]["podSelector"]
                 and selects(policy["spec"]["podSelector"], pod_labels(deployment))
                 for rule in policy["spec"].get("ingress", [])
                 if any(p.get("port") in ("grpc", grpc_port) for p in rule.get("ports", []))]
        assert rules, f"{service}: nothing may call it"
        peers = [peer for rule in rules for peer in rule.get("from", [])]
        assert all(rule.get("from") for rule in rules), f"{service}: gRPC open to anyone"
        assert not any("ipBlock" in peer for peer in peers), service
        services_admitted = {peer["podSelector"]["matchLabels"]["app.kubernetes.io/name"]
                             for peer in peers if "namespaceSelector" not in peer
                             and "app.kubernetes.io/name" in
                             peer.get("podSelector", {}).get("matchLabels", {})}
        assert services_admitted == callers(service), service
        others = [peer for peer in peers if "app.kubernetes.io/name" not in
                  peer.get("podSelector", {}).get("matchLabels", {})]
        assert others, f"{service}: clients labelled tally.dev/client cannot call it"
        for peer in others:  # every other caller must carry the client label
            assert peer.get("podSelector", {}).get("matchLabels") == CLIENT_LABEL, peer


@per_overlay
def test_the_otlp_endpoint_is_the_collector(
        rendered: dict[str, list[Document]], overlay: str) -> None:
    docs = rendered[overlay]
    collector = named(docs, "Deployment", "otel-collector")
    config_map = next(v["configMap"]["name"] for v in pod_spec(collector)["volumes"]
                      if "configMap" in v)
    pipeline = yaml.safe_load(named(docs, "ConfigMap", config_map)["data"]["config.yaml"])
    receiver_port = int(pipeline["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"]
                        .rpartition(":")[2])
    assert "otlp" in pipeline["service"]["pipelines"]["traces"]["receivers"]
    for service, deployment in tally_deployments(docs).items():
        endpoint = urlsplit(environment(deployment_container(deployment), docs)
                            ["OTEL_EXPORTER_OTLP_ENDPOINT"])
        svc = named(docs, "Service", endpoint.hostname or "")
        assert selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(collector))
        (port,) = [p for p in svc["spec"]["ports"] if p["port"] == endpoint.port]
        target = {p["name"]: p["containerPort"] for p in deployment_container(collector)
                  ["ports"]}.get(port["targetPort"], port["targetPort"])
        assert target == receiver_port, service


@per_overlay
def test_no_secret_values_are_committed(
        rendered: dict[str, list[Document]], overlay: str) -> None:
    docs = rendered[overlay]
    assert [d for d in of_kind(docs, "Secret") if d.get("data") or d.get("stringData")] == []
    for config_map in of_kind(docs, "ConfigMap"):
        assert not {"TALLY_DATABASE_URL", "TALLY_REDIS_URL"} & set(config_map.get("data", {}))
    for workload in workloads(docs):
        for container in containers(workload):
            for var in container.get("env", []):
                if var["name"] in ("TALLY_DATABASE_URL", "TALLY_REDIS_URL"):
                    assert "secretKeyRef" in var.get("valueFrom", {}), var
    for path in (ROOT / "k8s").rglob("*.yaml"):
        text = path.read_text()
        assert "secretGenerator" not in text and not re.search(r"^kind:\s*Secret\b", text,
                                                                re.M), path


@per_overlay
def test_metering_shares_quota_counters_whenever_it_can_scale(
        rendered: dict[str, list[Document]], overlay: str) -> None:
    docs = rendered[overlay]
    metering = tally_deployments(docs)["metering"]
    _, most = replica_range(docs, metering)
    container = deployment_container(metering)
    settings = load(MeteringConfig, environment(container, docs))
    if most > 1:
        assert settings.limiter == "redis", f"{overlay}: {most} replicas, in-process quotas"
        (redis,) = [v for v in container["env"] if v["name"] == "TALLY_REDIS_URL"]
        assert redis["valueFrom"]["secretKeyRef"].get("optional") is not True


def test_prod_takes_payments_through_stripe_with_its_keys_from_a_secret(
        rendered: dict[str, list[Document]]) -> None:
    docs = rendered["prod"]
    ledger = tally_deployments(docs)["ledger"]
    container = deployment_container(ledger)
    env = environment(container, docs)
    settings = load(LedgerConfig, env)
    assert (settings.environment, settings.payment_provider) == ("production", "stripe")
    # what the ledger builds at start-up from these settings: Stripe, not a refusal
    provider = payment_provider(load_kit_config(env), settings, settings.webhook_secrets)
    assert isinstance(provider, StripeProvider)
    by_name = {var["name"]: var for var in container["env"]}
    for var, key in (("TALLY_LEDGER_STRIPE_SECRET_KEY", "stripe-secret-key"),
                     ("TALLY_LEDGER_WEBHOOK_SECRETS", "webhook-secrets")):
        ref = by_name[var]["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"], ref.get("optional")) == ("tally-payments", key, False)
    for config_map in of_kind(docs, "ConfigMap"):
        data = config_map.get("data", {})
        assert not {"TALLY_LEDGER_STRIPE_SECRET_KEY", "TALLY_LEDGER_WEBHOOK_SECRETS"} & set(
            data), "payment secrets belong in a Secret"


def test_dev_may_run_the_local_payment_provider(rendered: dict[str, list[Document]]) -> None:
    docs = rendered["dev"]
    env = environment(deployment_container(tally_deployments(docs)["ledger"]), docs)
    settings = load(LedgerConfig, env)
    assert (settings.environment, settings.payment_provider) == ("development", "local")


def test_prod_is_meshed_and_never_runs_a_single_replica(
        rendered: dict[str, list[Document]]) -> None:
    docs = rendered["prod"]
    for deployment in of_kind(docs, "Deployment"):
        name = deployment["metadata"]["name"]
        annotations = deployment["spec"]["template"]["metadata"].get("annotations", {})
        assert annotations.get("linkerd.io/inject") == "enabled", name
        fewest, _ = replica_range(docs, deployment)
        assert fewest >= 2, f"prod {name} may run {fewest} replica(s)"
        assert deployment["spec"].get("replicas", 2) >= 2, name
    for service in TALLY_SERVICES:
        assert hpa_for(docs, tally_deployments(docs)[service]) is not None, service
    assert load(MeteringConfig, environment(
        deployment_container(tally_deployments(docs)["metering"]), docs)).limiter == "redis"


def test_dev_runs_one_replica_of_each_service(rendered: dict[str, list[Document]]) -> None:
    docs = rendered["dev"]
    for service, deployment in tally_deployments(docs).items():
        assert replica_range(docs, deployment) == (1, 1), service
        assert hpa_for(docs, deployment) is None, service


@per_overlay
def test_services_dial_their_peers_through_the_peers_service(
        rendered: dict[str, list[Document]], overlay: str) -> None:
    docs = rendered[overlay]
    deployments = tally_deployments(docs)
    for service, deployment in deployments.items():
        config = kit_config(deployment, docs)
        for peer in callees(service):
            address = config.address_of(peer)
            host, _, port = address.rpartition(":")
            names = {s["metadata"]["name"] for s in of_kind(docs, "Service")}
            assert host.split(".")[0] in names, f"{service} dials {peer} at {address}"
            svc = named(docs, "Service", host.split(".")[0])
            assert selects({"matchLabels": svc["spec"]["selector"]},
                           pod_labels(deployments[peer])), f"{service} -> {peer}: {host}"
            assert int(port) in {p["port"] for p in svc["spec"]["ports"]}


def test_the_image_runs_as_the_pods_user_and_picks_the_service_by_argument() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    instructions = [line.strip() for line in dockerfile.splitlines()
                    if line.strip() and not line.lstrip().startswith("#")]
    users = [line.split()[1] for line in instructions if line.startswith("USER ")]
    assert users and users[-1].split(":")[0] == str(USER_ID)
    assert 'ENTRYPOINT ["python", "-m"]' in instructions
    assert 'CMD ["services.ledger"]' in instructions
    assert "[dev]" not in dockerfile
    stages = [line for line in instructions if line.startswith("FROM ")]
    assert len(stages) >= 2, "multi-stage: build tools stay out of the runtime image"


@per_overlay
def test_no_overlay_trusts_callers_and_the_mesh_identity_is_trusted_only_when_meshed(
        rendered: dict[str, list[Document]], overlay: str) -> None:
    docs = rendered[overlay]
    for service, deployment in tally_deployments(docs).items():
        env = environment(deployment_container(deployment), docs)
        assert env.get("TALLY_AUTH_MODE", "enforce") == "enforce", service
        meshed = pod_labels(deployment) and deployment["spec"]["template"]["metadata"].get(
            "annotations", {}).get("linkerd.io/inject") == "enabled"
        assert (env.get("TALLY_AUTH_MESH_IDENTITY") == "true") == bool(meshed), service


# --- the portal ----------------------------------------------------------------------------


@per_overlay
def test_the_portal_is_probed_over_http_on_its_configured_port_and_serves_there(
        rendered: dict[str, list[Document]], overlay: str) -> None:
    docs = rendered[overlay]
    portal = portal_deployment(docs)
    container = deployment_container(portal)
    settings = load(PortalConfig, environment(container, docs))
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == settings.port
    paths = {kind: container[kind]["httpGet"] for kind in
             ("startupProbe", "livenessProbe", "readinessProbe")}
    assert all(p["port"] in ("http", settings.port) for p in paths.values()), paths
    # the routes the portal serves (services/portal/routes.py)
    assert paths["livenessProbe"]["path"] == "/healthz"
    assert paths["readinessProbe"]["path"] == "/readyz"
    svc = named(docs, "Service", WEB)
    assert selects({"matchLabels": svc["spec"]["selector"]}, pod_labels(portal))
    (port,) = svc["spec"]["ports"]
    assert port["targetPort"] in ("http", settings.port)


@per_overlay
def test_the_portal_settings_parse_and_it_reaches_the_services_as_their_client(
        rendered: dict[str, list[Document]], overlay: str) -> None:
    docs = rendered[overlay]
    portal = portal_deployment(docs)
    env = environment(deployment_container(portal), docs)
    # the shared tally-config carries every service's settings; the portal's own must exist
    known = setting_names(KitConfig, MeteringConfig, PricingConfig, LedgerConfig, AuthConfig,
                          AccountsConfig, PortalConfig) | set(tls.SETTINGS)
    unknown = {name for name in env if name.startswith("TALLY_")} - known
    assert not unknown, f"portal: settings nobody reads: {sorted(unknown)}"
    settings = load(PortalConfig, env)
    assert settings.oidc_issuer.startswith("https://") and not settings.dev_sign_in
    config = load_kit_config(env)
    assert config.host == "0.0.0.0"
    # every service admits tally.dev/client pods, and knows the portal's identity
    assert selects({"matchLabels": CLIENT_LABEL}, pod_labels(portal))
    assert load(AuthConfig, env).services["portal"][0] == frozenset({"internal"})
    if env.get("TALLY_AUTH_MESH_IDENTITY") != "true":  # no mesh: its own certificate
        files = tls.client_files(env)
        assert files is not None, f"{overlay}: the portal has no client certificate"
        mounts = {m["mountPath"]: m["name"] for m in deployment_container(portal)
                  ["volumeMounts"]}
        volumes = {v["name"]: v for v in pod_spec(portal)["volumes"]}
        volume = volumes[mounts[str(files.cert.parent)]]
        assert volume["secret"]["secretName"] == "tally-portal-tls"


@per_overlay
def test_the_portal_shares_sessions_through_redis_whenever_it_can_scale(
        rendered: dict[str, list[Document]], overlay: str) -> None:
    docs = rendered[overlay]
    portal = portal_deployment(docs)
    _, most = replica_range(docs, portal)
    container = deployment_container(portal)
    (redis,) = [v for v in container["env"] if v["name"] == "TALLY_REDIS_URL"]
    assert redis["valueFrom"]["secretKeyRef"]["name"] == "tally-redis"
    if most > 1:
        assert redis["valueFrom"]["secretKeyRef"].get("optional") is False, (
            f"{overlay}: {most} portal replicas may start without shared sessions")
        assert load(PortalConfig, environment(container, docs)).redis_sessions
