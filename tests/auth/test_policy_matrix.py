"""Every RPC × every role × own org / other org / no credentials, through the guard every
server runs, on the policy table the guard uses; and the table against the contracts."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.descriptor import Descriptor, MethodDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

import tally
from tally.accounts.v1 import accounts_pb2
from tally.kit import policy
from tally.kit.errors import Reason, TallyError

from .conftest import SERVICE_OF_ROLE, Identities, bearer, mesh


def _contracts() -> tuple[Any, ...]:
    """Every generated contract module (libs/tally/<package>/v1/*_pb2.py): a new proto file's
    services are walked without anyone listing them here."""
    root = Path(tally.__file__).resolve().parent
    return tuple(importlib.import_module(f"tally.{path.parent.parent.name}.v1.{path.stem}")
                 for path in sorted(root.glob("*/v1/*_pb2.py")))


# Envoy's rate-limit service is served by metering from vendored contracts (libs/envoy).
CONTRACTS = (*_contracts(), importlib.import_module("envoy.service.ratelimit.v3.rls_pb2"))
PEOPLE = ("owner", "admin", "billing", "developer", "viewer")
ROLES = (*PEOPLE, policy.GATEWAY, policy.INTERNAL, policy.OPERATOR, policy.FINANCE)


def methods() -> dict[str, MethodDescriptor]:
    """Every RPC of every Tally contract, by full method name."""
    return {f"/{service.full_name}/{m.name}": m
            for module in CONTRACTS for service in module.DESCRIPTOR.services_by_name.values()
            for m in service.methods}


def org_paths(message: Descriptor, prefix: str = "", depth: int = 0) -> set[str]:
    """Every path to an `org_id` field in a request type."""
    found: set[str] = set()
    for f in message.fields:
        path = prefix + f.name + ("[]" if f.is_repeated else "")
        if f.name == "org_id":
            found.add(path)
        if f.message_type is not None and f.message_type.full_name == (
                "envoy.extensions.common.ratelimit.v3.RateLimitDescriptor"):
            found.add(path + ".entries[key=org_id].value")  # Envoy names orgs in entries
            continue
        if (f.message_type is not None and depth < 3
                and not f.message_type.full_name.startswith("google.")):
            found |= org_paths(f.message_type, path + ".", depth + 1)
    return found


def set_org(message: Any, path: str, org: str) -> None:
    head, _, rest = path.partition(".")
    if head.endswith("]") and "[key=" in head:
        name, _, key = head[:-1].partition("[key=")
        item = getattr(message, name).add(key=key)
        set_org(item, rest, org)
    elif head.endswith("[]"):
        set_org(getattr(message, head[:-2]).add(), rest, org)
    elif not rest:
        setattr(message, head, org)
    else:
        set_org(getattr(message, head), rest, org)


def request_for(method: MethodDescriptor, org: str) -> Message:
    """The method's request naming `org` at every path the policy reads."""
    message: Message = GetMessageClass(method.input_type)()
    for path in policy.POLICY[f"/{method.containing_service.full_name}/{method.name}"
                              ].org_fields:
        set_org(message, path, org)
    return message


def test_every_rpc_of_every_contract_has_exactly_one_policy_entry() -> None:
    assert sorted(methods()) == sorted(policy.POLICY)


@pytest.mark.parametrize("name", sorted(methods()))
def test_the_policy_reads_every_org_the_request_can_name(name: str) -> None:
    rule = policy.POLICY[name]
    declared = {p.replace("[].", "[].") for p in rule.org_fields}
    assert org_paths(methods()[name].input_type) == declared


def test_money_and_membership_stay_with_the_roles_that_own_them() -> None:
    """Written out by hand, not derived from the table: the cells that matter most."""
    allowed = {name.rsplit("/", 1)[1]: rule.roles for name, rule in policy.POLICY.items()
               if "AccountsService" not in name}
    for rpc in ("Transfer", "TransferBatch", "Adjust", "Refund", "RecordManualPayment",
                "ApproveManualPayment"):
        assert allowed[rpc] == {"finance"}, rpc
    assert allowed["PublishPriceBook"] == {"operator"}
    assert "billing" in allowed["Purchase"] and "developer" not in allowed["Purchase"]
    assert "viewer" not in allowed["ListPaymentOrders"]
    assert "developer" in allowed["Authorize"] and "viewer" not in allowed["Authorize"]
    accounts = {name.rsplit("/", 1)[1]: rule.roles for name, rule in policy.POLICY.items()
                if "AccountsService" in name}
    assert accounts["InviteMember"] == {"owner", "operator"}
    assert accounts["WatchCredentials"] == {"internal"}


async def test_exactly_the_allowed_cells_pass_the_guard(ids: Identities) -> None:
    guard = await ids.started(ids.guard())
    credentials: dict[str, dict[str, str]] = {}
    for role in PEOPLE:
        subject = await ids.person("acme", role)
        credentials[role] = bearer(ids.provider.token(subject))
    gateway = await ids.key("acme", accounts_pb2.ROLE_GATEWAY)
    credentials[policy.GATEWAY] = bearer(gateway.secret)
    for role, service in SERVICE_OF_ROLE.items():
        credentials[role] = mesh(service)
    await ids.synced(guard)

    cells = 0
    wrong: list[str] = []
    for name, method in sorted(methods().items()):
        rule = policy.POLICY[name]
        for org in ("acme", "beta"):
            request = request_for(method, org)
            for role in ROLES:
                expected = role in rule.roles and (
                    org == "acme" or role in (policy.INTERNAL, policy.OPERATOR,
                                              policy.FINANCE)
                    or not rule.org_fields)
                try:
                    if method.client_streaming:
                        principal = await guard.admit(name, credentials[role], None, None)
                        guard.check_message(principal, name, request)
                    else:
                        await guard.admit(name, credentials[role], None, request)
                    passed = True
                except TallyError as exc:
                    assert exc.reason is Reason.PERMISSION_DENIED, (name, role, exc)
                    assert rule.permission(name) in exc.message
                    passed = False
                cells += 1
                if passed != expected:
                    wrong.append(f"{name} {role} {org}: passed={passed}")
        with pytest.raises(TallyError) as anonymous:
            await guard.admit(name, {}, None, request_for(method, "acme"))
        assert anonymous.value.reason is Reason.UNAUTHENTICATED
    assert not wrong, "\n".join(wrong)
    assert cells == len(policy.POLICY) * len(ROLES) * 2
