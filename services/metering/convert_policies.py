"""tally.metering.v1 budgets, quotas and spend policies <-> the policies domain.

Incoming messages become specs as sent: an UNSPECIFIED (or unknown) enum is None, and
`policies.validate_*` names it with every other bad field. Output-only fields are not read.
"""

from __future__ import annotations

from tally.common.v1 import common_pb2
from tally.kit import errors
from tally.kit.protoconv import enum_or_none, enum_out, from_timestamp, to_timestamp
from tally.kit.server import current_principal
from tally.metering.v1 import metering_pb2 as pb
from tally.sdk.pricebook import meter_from_proto

from .policies import (
    MAX_ID_LENGTH,
    MAX_PRICING_USE_METERS,
    MAX_PRICING_USE_MODELS,
    RECENT_EVENTS_COUNTED,
    BudgetEnforcement,
    BudgetPeriod,
    BudgetScope,
    BudgetSpec,
    BudgetSpend,
    PricingUse,
    Quota,
    QuotaEnforcement,
    QuotaKind,
    QuotaScope,
    QuotaSpec,
    SpendPolicy,
)


def actor(context: common_pb2.RequestContext) -> str:
    """Who made a change: the context's actor, else the authenticated caller."""
    principal = current_principal.get()
    return context.actor or (principal.identity if principal else "service:anonymous")


def budget_spec(m: pb.Budget) -> BudgetSpec:
    """The writable fields of a wire budget."""
    return BudgetSpec(
        name=m.name, scope=enum_or_none(pb.BudgetScope, "BUDGET_SCOPE_", m.scope, BudgetScope),
        scope_value=m.scope_value,
        period=enum_or_none(pb.BudgetPeriod, "BUDGET_PERIOD_", m.period, BudgetPeriod),
        period_start=from_timestamp(m, "period_start"),
        period_end=from_timestamp(m, "period_end"), limit_micros=m.limit_micros,
        alarm_thresholds_percent=tuple(m.alarm_thresholds_percent),
        enforcement=enum_or_none(pb.BudgetEnforcement, "BUDGET_ENFORCEMENT_", m.enforcement,
                                 BudgetEnforcement),
        downgrade_at_percent=m.downgrade_at_percent)


def budget(s: BudgetSpend) -> pb.Budget:
    """The wire budget with its spend; period_start/end are the period the spend is of."""
    b = s.budget
    return pb.Budget(
        budget_id=b.budget_id, org_id=b.org_id, name=b.name,
        scope=enum_out(pb.BudgetScope, "BUDGET_SCOPE_", b.scope), scope_value=b.scope_value,
        period=enum_out(pb.BudgetPeriod, "BUDGET_PERIOD_", b.period),
        period_start=to_timestamp(s.period_start), period_end=to_timestamp(s.period_end),
        limit_micros=b.limit_micros, alarm_thresholds_percent=list(b.alarm_thresholds_percent),
        enforcement=enum_out(pb.BudgetEnforcement, "BUDGET_ENFORCEMENT_", b.enforcement),
        downgrade_at_percent=b.downgrade_at_percent, spent_micros=s.spent_micros,
        reserved_micros=s.reserved_micros, created_at=to_timestamp(b.created_at),
        updated_at=to_timestamp(b.updated_at))


def quota_spec(m: pb.Quota) -> QuotaSpec:
    """The writable fields of a wire quota."""
    return QuotaSpec(
        scope=enum_or_none(pb.QuotaScope, "QUOTA_SCOPE_", m.scope, QuotaScope),
        scope_value=m.scope_value,
        kind=enum_or_none(pb.QuotaKind, "QUOTA_KIND_", m.kind, QuotaKind),
        limit=m.limit, burst=m.burst,
        enforcement=enum_or_none(pb.QuotaEnforcement, "QUOTA_ENFORCEMENT_", m.enforcement,
                                 QuotaEnforcement),
        long_context_threshold_tokens=m.long_context_threshold_tokens)


def quota(q: Quota) -> pb.Quota:
    """The wire quota."""
    return pb.Quota(
        quota_id=q.quota_id, org_id=q.org_id,
        scope=enum_out(pb.QuotaScope, "QUOTA_SCOPE_", q.scope), scope_value=q.scope_value,
        kind=enum_out(pb.QuotaKind, "QUOTA_KIND_", q.kind), limit=q.limit, burst=q.burst,
        enforcement=enum_out(pb.QuotaEnforcement, "QUOTA_ENFORCEMENT_", q.enforcement),
        long_context_threshold_tokens=q.long_context_threshold_tokens,
        created_at=to_timestamp(q.created_at), updated_at=to_timestamp(q.updated_at))


def policy_in(m: pb.SpendPolicy) -> SpendPolicy:
    """The policy a client asks for (updated_at/by are output only)."""
    return SpendPolicy(org_id=m.org_id, max_context_tokens=m.max_context_tokens,
                       max_upload_bytes=m.max_upload_bytes,
                       long_context_threshold_tokens=m.long_context_threshold_tokens,
                       throttled_requests_per_second=m.throttled_requests_per_second)


def policy(p: SpendPolicy) -> pb.SpendPolicy:
    """The wire policy; updated_at unset for the defaults of a never-set policy."""
    return pb.SpendPolicy(
        org_id=p.org_id, max_context_tokens=p.max_context_tokens,
        max_upload_bytes=p.max_upload_bytes,
        long_context_threshold_tokens=p.long_context_threshold_tokens,
        throttled_requests_per_second=p.throttled_requests_per_second,
        updated_at=to_timestamp(p.updated_at), updated_by=p.updated_by)


def pricing_use_query(request: pb.GetPricingUseRequest) -> tuple[list[str], list[str]]:
    """(models, meter wire names) of a GetPricingUse request; INVALID_ARGUMENT names the
    field of the first problem."""
    if len(request.models) > MAX_PRICING_USE_MODELS:
        raise errors.invalid("models", f"at most {MAX_PRICING_USE_MODELS}")
    if len(request.meters) > MAX_PRICING_USE_METERS:
        raise errors.invalid("meters", f"at most {MAX_PRICING_USE_METERS}")
    meters = []
    for i, number in enumerate(request.meters):
        try:
            meters.append(meter_from_proto(number).value)
        except ValueError:
            raise errors.invalid(f"meters[{i}]", f"{number} is not a known meter") from None
    for i, model in enumerate(request.models):
        if not model or len(model) > MAX_ID_LENGTH:
            raise errors.invalid(f"models[{i}]", f"must be 1..{MAX_ID_LENGTH} characters")
    return list(dict.fromkeys(request.models)), list(dict.fromkeys(meters))


def pricing_use(use: PricingUse) -> pb.PricingUse:
    """The wire form of what uses one model or meter."""
    return pb.PricingUse(item=use.item, recent_events=use.recent_events,
                         open_holds=use.open_holds, quota_ids=use.quota_ids,
                         budget_ids=use.budget_ids)


def merge_pricing_use(request: pb.GetPricingUseRequest,
                      answers: list[pb.GetPricingUseResponse]) -> pb.GetPricingUseResponse:
    """One GetPricingUse answer from every region's (a process serving several regions,
    tally.kit.regions): an item is in use if it is in any region; its counts add up (recent
    events still counted up to RECENT_EVENTS_COUNTED), its quota and budget ids are all
    regions' ids; models first, each in request order, as one region answers."""
    models, meters = pricing_use_query(request)
    order = {item: i for i, item in enumerate(
        [f"model {m}" for m in models] + [f"meter {m}" for m in meters])}
    merged: dict[str, pb.PricingUse] = {}
    for answer in answers:
        for use in answer.uses:
            into = merged.setdefault(use.item, pb.PricingUse(item=use.item))
            into.recent_events = min(into.recent_events + use.recent_events,
                                     RECENT_EVENTS_COUNTED)
            into.open_holds += use.open_holds
            into.quota_ids.extend(q for q in use.quota_ids if q not in into.quota_ids)
            into.budget_ids.extend(b for b in use.budget_ids if b not in into.budget_ids)
    return pb.GetPricingUseResponse(uses=sorted(
        merged.values(), key=lambda use: order.get(use.item, len(order))))
