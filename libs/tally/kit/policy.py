"""The one policy table: per RPC, which roles may call it and where its org is in the request.

The kit's guard (tally.kit.auth) checks every call against this table before the handler runs,
and tests/auth/test_policy_matrix.py walks the same table (every RPC of every service, every
role, own org / other org / no credentials; an RPC missing here fails it, and the guard
refuses it).

Roles of people and API keys hold within one org: owner, admin, billing, developer, viewer,
and gateway (a machine key in front of model calls). Service roles come from a verified
service identity (mTLS or the mesh) and hold for every org, or for the orgs a gateway is
bound to: `internal` (Tally's own services calling each other), `operator` (runs the
platform), `finance` (the platform's finance team).

Money rules (DESIGN §8): credit is created only by a verified payment, by finance (grants,
adjustments, refunds and manual settlement with four eyes), never by an org's own members —
an org admin who could grant credits or settle a payment would pay themselves. An org's
owner, admin and billing members may buy credit (Purchase), which the payment provider
settles.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

OWNER: Final = "owner"
ADMIN: Final = "admin"
BILLING: Final = "billing"
DEVELOPER: Final = "developer"
VIEWER: Final = "viewer"
GATEWAY: Final = "gateway"
INTERNAL: Final = "internal"
OPERATOR: Final = "operator"
FINANCE: Final = "finance"

ORG_ROLES: Final = frozenset({OWNER, ADMIN, BILLING, DEVELOPER, VIEWER, GATEWAY})
"""Roles held within one org (members and API keys)."""
SERVICE_ROLES: Final = frozenset({INTERNAL, OPERATOR, FINANCE, GATEWAY})
"""Roles of verified service identities."""

_PEOPLE_READ = frozenset({OWNER, ADMIN, BILLING, DEVELOPER, VIEWER})
_PLATFORM = frozenset({INTERNAL, OPERATOR, FINANCE})
READ: Final = _PEOPLE_READ | _PLATFORM
"""Reading an org's own data."""
USE: Final = frozenset({OWNER, ADMIN, DEVELOPER, GATEWAY, INTERNAL})
"""The hot path: authorize, record usage, hold credit."""
MANAGE: Final = frozenset({OWNER, ADMIN, OPERATOR})
"""Configuring an org: budgets, quotas, policies, alert rules, projects, keys."""
MONEY_READ: Final = frozenset({OWNER, ADMIN, BILLING}) | _PLATFORM
"""Payment details: not for developers and viewers."""
BUY: Final = frozenset({OWNER, ADMIN, BILLING, INTERNAL})
"""Buying credit through the payment provider."""
CREDIT: Final = frozenset({FINANCE})
"""Creating or moving credit by hand: grants, adjustments, refunds, manual settlement."""
KEYS: Final = MANAGE | {DEVELOPER}
"""Managing API keys: developers too, but only of roles no stronger than their own."""
KEY_MANAGERS: Final = frozenset({OWNER, ADMIN, OPERATOR, INTERNAL})
"""Who may create, rotate and revoke keys of any key role."""
CATALOG: Final = ORG_ROLES | _PLATFORM
"""The public catalog (price books, packages): anyone verified."""


@dataclass(frozen=True, slots=True)
class Rule:
    """Who may call one RPC, and which org it acts on."""

    roles: frozenset[str]
    """Roles allowed (any one suffices)."""
    org_fields: tuple[str, ...] = ()
    """Paths to the org ids the request acts on: `context.org_id`, `events[].context.org_id`
    (`[]` walks a repeated field; `[key=K]` only its items whose `key` is K, for Envoy's
    descriptor entries). Every non-empty one is checked."""
    org_required: bool = True
    """Whether a caller limited to some orgs must name one (False: an unnamed org means the
    shared catalog or all orgs, which only needs the role)."""

    def permission(self, method: str) -> str:
        """The permission's name in denials: `<service>.<Method>`, e.g. `ledger.Adjust`."""
        service, _, short = method.lstrip("/").partition("/")
        if service.startswith("envoy."):
            return f"ratelimit.{short}"
        return f"{service.split('.')[1]}.{short}"


def _rule(roles: frozenset[str], *org_fields: str, required: bool = True) -> Rule:
    return Rule(roles, org_fields, required)


_CTX = "context.org_id"
_ORG = "org_id"

_PRICING = "/tally.pricing.v1.PricingService/"
_METERING = "/tally.metering.v1.MeteringService/"
_LEDGER = "/tally.ledger.v1.LedgerService/"
_BILLING = "/tally.ledger.v1.BillingService/"
_NOTIFIER = "/tally.notifier.v1.NotifierService/"
_ACCOUNTS = "/tally.accounts.v1.AccountsService/"
_ENVOY_RLS = "/envoy.service.ratelimit.v3.RateLimitService/"

POLICY: Final[Mapping[str, Rule]] = {
    # pricing: a public catalog; publishing and simulating are the platform's
    _PRICING + "Quote": _rule(CATALOG, _CTX, required=False),
    _PRICING + "GetPriceBook": _rule(CATALOG),
    _PRICING + "WatchPriceBook": _rule(CATALOG),
    _PRICING + "PublishPriceBook": _rule(frozenset({OPERATOR}), _CTX, required=False),
    _PRICING + "SimulatePriceChange": _rule(frozenset({OPERATOR, FINANCE}), _ORG,
                                            required=False),
    _PRICING + "ListCreditPackages": _rule(CATALOG),
    _PRICING + "MarginReport": _rule(frozenset({OPERATOR, FINANCE})),
    _PRICING + "ListPriceBookVersions": _rule(CATALOG),
    # metering
    _METERING + "Authorize": _rule(USE, _CTX),
    _METERING + "RecordUsage": _rule(USE, "events[].context.org_id"),
    _METERING + "StreamUsage": _rule(USE, "events[].context.org_id"),
    _METERING + "GetUsageSummary": _rule(READ, _ORG),
    _METERING + "GetBatchUsage": _rule(MONEY_READ, _ORG),
    _METERING + "ExportUsage": _rule(READ, _ORG),
    _METERING + "GetUsageEvent": _rule(READ, _ORG),
    _METERING + "CreateBudget": _rule(MANAGE | {BILLING}, _CTX, "budget.org_id"),
    _METERING + "UpdateBudget": _rule(MANAGE | {BILLING}, _CTX, "budget.org_id"),
    _METERING + "GetBudget": _rule(READ, _ORG),
    _METERING + "ListBudgets": _rule(READ, _ORG),
    _METERING + "DeleteBudget": _rule(MANAGE | {BILLING}, _CTX, _ORG),
    _METERING + "CreateQuota": _rule(MANAGE, _CTX, "quota.org_id"),
    _METERING + "UpdateQuota": _rule(MANAGE, _CTX, "quota.org_id"),
    _METERING + "GetQuota": _rule(READ, _ORG),
    _METERING + "ListQuotas": _rule(READ, _ORG),
    _METERING + "DeleteQuota": _rule(MANAGE, _CTX, _ORG),
    _METERING + "SetSpendPolicy": _rule(MANAGE, _CTX, "policy.org_id"),
    _METERING + "GetSpendPolicy": _rule(READ, _ORG),
    _METERING + "StreamEvents": _rule(frozenset({INTERNAL, OPERATOR})),
    # Envoy's rate-limit service, served by metering: the mesh asks for the orgs in its
    # descriptors (entries with key org_id); counts quota hits, so the hot path's roles
    _ENVOY_RLS + "ShouldRateLimit": _rule(USE, "descriptors[].entries[key=org_id].value"),
    _METERING + "GetPricingUse": _rule(frozenset({INTERNAL, OPERATOR})),
    # ledger
    _LEDGER + "Transfer": _rule(CREDIT, _CTX, _ORG),
    _LEDGER + "TransferBatch": _rule(CREDIT, _CTX, "transfers[].context.org_id",
                                     "transfers[].org_id"),
    _LEDGER + "Adjust": _rule(CREDIT, _CTX, _ORG),
    _LEDGER + "Reserve": _rule(USE, _CTX, _ORG),
    _LEDGER + "Capture": _rule(USE, _CTX, _ORG),
    _LEDGER + "Release": _rule(USE, _CTX, _ORG),
    _LEDGER + "GetReservation": _rule(READ | {GATEWAY}, _ORG),
    _LEDGER + "PostUsageBatch": _rule(frozenset({INTERNAL}), "items[].org_id",
                                        "org_debits[].org_id", _CTX),
    # credit leases are held by metering for the orgs it authorizes: services only
    _LEDGER + "ExtendLease": _rule(frozenset({INTERNAL}), _CTX, _ORG),
    _LEDGER + "GetBalance": _rule(READ | {GATEWAY}, _ORG),
    _LEDGER + "SetBillingState": _rule(frozenset({FINANCE, OPERATOR, INTERNAL}), _CTX, _ORG),
    _LEDGER + "GetTransfer": _rule(READ, _ORG),
    _LEDGER + "ListTransactions": _rule(READ, _ORG),
    _LEDGER + "VerifyLedger": _rule(READ, _ORG),
    _LEDGER + "Purchase": _rule(BUY, _CTX, _ORG),
    _LEDGER + "GetPaymentOrder": _rule(MONEY_READ, _ORG),
    _LEDGER + "ListPaymentOrders": _rule(MONEY_READ, _ORG),
    _LEDGER + "ConfirmPayment": _rule(frozenset({FINANCE, OPERATOR, INTERNAL})),
    _LEDGER + "RecordManualPayment": _rule(CREDIT, _CTX, _ORG),
    _LEDGER + "ApproveManualPayment": _rule(CREDIT, _CTX, required=False),
    _LEDGER + "Refund": _rule(CREDIT, _CTX, required=False),
    _LEDGER + "SetAutoTopUp": _rule(frozenset({OWNER, ADMIN, BILLING}), _CTX,
                                    "auto_top_up.org_id"),
    _LEDGER + "GetAutoTopUp": _rule(MONEY_READ, _ORG),
    _LEDGER + "StreamEvents": _rule(frozenset({INTERNAL, OPERATOR})),
    # notifier
    _NOTIFIER + "Subscribe": _rule(READ, _ORG),
    _NOTIFIER + "CreateAlertRule": _rule(MANAGE | {BILLING}, "rule.org_id", _CTX),
    _NOTIFIER + "UpdateAlertRule": _rule(MANAGE | {BILLING}, "rule.org_id", _CTX),
    _NOTIFIER + "GetAlertRule": _rule(READ, _ORG),
    _NOTIFIER + "ListAlertRules": _rule(READ, _ORG),
    _NOTIFIER + "DeleteAlertRule": _rule(MANAGE | {BILLING}, _ORG, _CTX),
    _NOTIFIER + "ListDeliveries": _rule(READ, _ORG),
    _NOTIFIER + "ReplayDeadLetters": _rule(MANAGE, _ORG, _CTX),
    _NOTIFIER + "RotateWebhookSecret": _rule(MANAGE, _ORG, _CTX),
    # accounts: members and seats are the owner's (and the operator's); keys are the org's
    # managers' and its developers' — a developer only of key roles no stronger than their
    # own (`may_manage_key_role`, enforced by accounts)
    _ACCOUNTS + "CreateOrg": _rule(frozenset({OPERATOR}), _ORG, _CTX, required=False),
    _ACCOUNTS + "GetOrg": _rule(READ, _ORG),
    _ACCOUNTS + "CreateProject": _rule(MANAGE, _ORG, _CTX),
    _ACCOUNTS + "ListProjects": _rule(READ, _ORG),
    _ACCOUNTS + "CreateEnvironment": _rule(MANAGE, _ORG, _CTX),
    _ACCOUNTS + "ListEnvironments": _rule(READ, _ORG),
    _ACCOUNTS + "InviteMember": _rule(frozenset({OWNER, OPERATOR}), _ORG, _CTX),
    _ACCOUNTS + "ChangeMemberRole": _rule(frozenset({OWNER, OPERATOR}), _ORG, _CTX),
    _ACCOUNTS + "RemoveMember": _rule(frozenset({OWNER, OPERATOR}), _ORG, _CTX),
    _ACCOUNTS + "ListMembers": _rule(frozenset({OWNER, ADMIN, BILLING, OPERATOR}), _ORG),
    _ACCOUNTS + "CreateApiKey": _rule(KEYS, _ORG, _CTX),
    _ACCOUNTS + "RotateApiKey": _rule(KEYS, _ORG, _CTX),
    _ACCOUNTS + "RevokeApiKey": _rule(KEYS, _ORG, _CTX),
    _ACCOUNTS + "ListApiKeys": _rule(KEYS, _ORG),
    _ACCOUNTS + "GetSeatUsage": _rule(frozenset({OWNER, ADMIN, BILLING, OPERATOR, FINANCE}),
                                      _ORG),
    _ACCOUNTS + "GetSeatReport": _rule(frozenset({OWNER, ADMIN, BILLING, OPERATOR, FINANCE}),
                                       _ORG),
    _ACCOUNTS + "SetSsoRequired": _rule(frozenset({OWNER, OPERATOR}), _ORG, _CTX),
    _ACCOUNTS + "WatchCredentials": _rule(frozenset({INTERNAL})),
    _ACCOUNTS + "AppendAudit": _rule(frozenset({INTERNAL}), "records[].org_id"),
    _ACCOUNTS + "VerifyAudit": _rule(frozenset({OWNER, ADMIN, OPERATOR, FINANCE}), _ORG),
    _ACCOUNTS + "ExportAudit": _rule(frozenset({OWNER, ADMIN, OPERATOR, FINANCE}), _ORG),
    # billing documents: profiles and invoices are payment details (not for developers and
    # viewers); tax rates are the issuer's, published by finance
    _BILLING + "SetBillingProfile": _rule(frozenset({OWNER, ADMIN, BILLING, OPERATOR}), _CTX,
                                          "profile.org_id"),
    _BILLING + "GetBillingProfile": _rule(MONEY_READ, _ORG),
    _BILLING + "DeleteBillingProfile": _rule(frozenset({OWNER, ADMIN, BILLING, OPERATOR}),
                                             _CTX, _ORG),
    _BILLING + "SetBillingSettings": _rule(frozenset({OWNER, ADMIN, OPERATOR, FINANCE}), _CTX,
                                           "settings.org_id"),
    _BILLING + "GetBillingSettings": _rule(MONEY_READ, _ORG),
    _BILLING + "GetTaxSnapshot": _rule(MONEY_READ, _ORG),
    _BILLING + "PublishTaxRates": _rule(frozenset({FINANCE}), _CTX, required=False),
    _BILLING + "GetTaxRates": _rule(CATALOG),
    _BILLING + "GetInvoice": _rule(MONEY_READ, _ORG),
    _BILLING + "ListInvoices": _rule(MONEY_READ, _ORG),
    _BILLING + "DownloadInvoicePdf": _rule(MONEY_READ, _ORG),
    _BILLING + "GetStatement": _rule(MONEY_READ, _ORG),
    _BILLING + "ListStatements": _rule(MONEY_READ, _ORG),
    _BILLING + "DownloadStatementPdf": _rule(MONEY_READ, _ORG),
    _BILLING + "ListDailySnapshots": _rule(MONEY_READ, _ORG),
    # an org's own reconciliation is its payment details; every org's (no org_id) is the
    # platform's, which only finance and operators hold
    _BILLING + "Reconcile": _rule(MONEY_READ, _ORG),
}
"""Every RPC of every Tally service. Health and reflection are infrastructure, not here."""


def permissions_of(role: str) -> frozenset[str]:
    """Every RPC the table lets `role` call."""
    return frozenset(method for method, rule in POLICY.items() if role in rule.roles)


def may_manage_key_role(held: frozenset[str], key_role: str) -> bool:
    """Whether someone holding `held` in an org may create, rotate or revoke a key of
    `key_role` there: any role for the org's managers (KEY_MANAGERS); else only a role whose
    every permission they hold themselves — a developer may manage developer, viewer and
    gateway keys, never billing or admin ones (no minting a key stronger than oneself)."""
    if held & KEY_MANAGERS:
        return True
    if not held & KEYS:
        return False
    mine = frozenset().union(*(permissions_of(role) for role in held))
    return permissions_of(key_role) <= mine


def org_ids(message: Any, path: str) -> Iterator[str]:
    """The non-empty org ids at `path` in `message` (`a.b`, `items[].org_id`)."""
    head, dot, rest = path.partition(".")
    if head.endswith("[]"):
        for item in getattr(message, head[:-2]):
            yield from org_ids(item, rest)
        return
    if head.endswith("]") and "[key=" in head:
        name, _, key = head[:-1].partition("[key=")
        for item in getattr(message, name):
            if item.key == key:
                yield from org_ids(item, rest)
        return
    if not dot:
        value = getattr(message, head)
        if value:
            yield value
        return
    if message.HasField(head):
        yield from org_ids(getattr(message, head), rest)


def orgs_named(rule: Rule, message: Any) -> set[str]:
    """Every org a request names, by the rule's paths."""
    found: set[str] = set()
    for path in rule.org_fields:
        found.update(org_ids(message, path))
    return found
