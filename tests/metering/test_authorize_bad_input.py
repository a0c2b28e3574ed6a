"""Authorize's answers to bad input carry the precise reason and name the field."""

from __future__ import annotations

import pytest

from tally.kit.errors import Reason, TallyError
from tests.metering.conftest import Suite
from tests.metering.test_authorize import DENY, ask


async def test_an_unknown_model_answers_reason_unknown_model(suite: Suite) -> None:
    with pytest.raises(TallyError) as caught:
        await suite.client.metering.Authorize(ask("x", model="no-such-model"))
    assert caught.value.reason is Reason.UNKNOWN_MODEL
    assert caught.value.field == "model"


@pytest.mark.parametrize("ttl_seconds", [2**63 - 1, -(2**63), 10**15])
async def test_a_huge_reservation_ttl_is_refused_naming_the_field(suite: Suite,
                                                                   ttl_seconds: int) -> None:
    with pytest.raises(TallyError) as caught:
        await suite.client.metering.Authorize(ask("x", reservation_ttl_seconds=ttl_seconds))
    assert caught.value.reason is Reason.INVALID_ARGUMENT
    assert caught.value.field == "reservation_ttl_seconds"


async def test_an_org_without_a_ledger_account_is_denied_with_a_reason(suite: Suite) -> None:
    reply = await suite.client.metering.Authorize(ask("no-account", org="never-funded"))
    assert (reply.decision, reply.deny_reason) == (DENY, "INSUFFICIENT_CREDITS")
    assert "no credit account" in reply.message
    assert not reply.reservation_id
