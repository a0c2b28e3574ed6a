"""Alert rules and webhook signing secrets through the real notifier server and PostgreSQL:
what is created reads back; every write is idempotent on its request id; bad input names every
bad field and writes nothing; rotation keeps the old secret valid for the overlap only."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
import typer
from google.protobuf.field_mask_pb2 import FieldMask

from services.notifier.store import WebhookSecrets
from tally.cli import alerts as alerts_cli
from tally.kit import db
from tally.kit.errors import Reason, TallyError
from tally.notifier.v1 import notifier_pb2 as pb
from tests.notifier.conftest import Notifier

ORG = "acme"
CREDIT = 1_000_000
CLI_TIMEOUT_S = 60
HOOK = "https://hooks.example.com/tally"


def a_rule(org: str = ORG, **fields: Any) -> pb.AlertRule:
    values: dict[str, Any] = dict(
        org_id=org, types=[pb.NOTIFICATION_TYPE_LOW_BALANCE], channel=pb.CHANNEL_WEBHOOK,
        webhook_url=HOOK, cooldown_seconds=600, low_balance_threshold_micros=100 * CREDIT,
        enabled=True)
    values.update(fields)
    return pb.AlertRule(**values)


async def create(n: Notifier, request_id: str, rule: pb.AlertRule) -> pb.AlertRule:
    reply = await n.client.notifier.CreateAlertRule(
        pb.CreateAlertRuleRequest(request_id=request_id, rule=rule))
    return reply.rule


async def update(n: Notifier, request_id: str, rule: pb.AlertRule, *paths: str
                 ) -> pb.AlertRule:
    reply = await n.client.notifier.UpdateAlertRule(pb.UpdateAlertRuleRequest(
        request_id=request_id, rule=rule, update_mask=FieldMask(paths=list(paths))))
    return reply.rule


async def refused(call: Awaitable[Any]) -> TallyError:
    with pytest.raises(TallyError) as caught:
        await call
    return caught.value


def status_of(error: TallyError) -> grpc.StatusCode:
    """The gRPC status the server actually sent (the client turned it into `error`)."""
    cause = error.__cause__
    assert isinstance(cause, grpc.aio.AioRpcError)
    return cause.code()


@pytest.fixture
async def sql(notifier: Notifier) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(db.asyncpg_url(notifier.db_url))
    yield conn
    await conn.close()


async def written(sql: asyncpg.Connection) -> tuple[int, int, int]:
    """Rows in alert_rules, admin_requests and webhook_secrets."""
    row = await sql.fetchrow(
        "SELECT (SELECT count(*) FROM notifier.alert_rules) AS rules, "
        "(SELECT count(*) FROM notifier.admin_requests) AS claims, "
        "(SELECT count(*) FROM notifier.webhook_secrets) AS secrets")
    assert row is not None
    return row["rules"], row["claims"], row["secrets"]


# --- create, get, list ------------------------------------------------------------------------


async def test_a_created_rule_reads_back_through_get_and_list(notifier: Notifier) -> None:
    created = await create(notifier, "c-1", a_rule())
    assert created.rule_id.startswith("rule_") and created.org_id == ORG
    assert list(created.types) == [pb.NOTIFICATION_TYPE_LOW_BALANCE]
    assert (created.channel, created.webhook_url) == (pb.CHANNEL_WEBHOOK, HOOK)
    assert created.low_balance_threshold_micros == 100 * CREDIT
    assert created.cooldown_seconds == 600 and created.enabled
    assert created.created_at.ByteSize() and created.created_at == created.updated_at

    got = await notifier.client.notifier.GetAlertRule(
        pb.GetAlertRuleRequest(org_id=ORG, rule_id=created.rule_id))
    assert got.rule == created
    mail = await create(notifier, "c-2", a_rule(
        types=[pb.NOTIFICATION_TYPE_PAYMENT_FAILED, pb.NOTIFICATION_TYPE_TOP_UP_FAILED],
        channel=pb.CHANNEL_EMAIL, webhook_url="", email_to="billing@acme.example",
        low_balance_threshold_micros=0, enabled=False))
    listed = await notifier.client.notifier.ListAlertRules(pb.ListAlertRulesRequest(org_id=ORG))
    assert [r.rule_id for r in listed.rules] == [mail.rule_id, created.rule_id]  # newest first
    assert listed.rules[0] == mail and not mail.enabled
    other = await notifier.client.notifier.ListAlertRules(pb.ListAlertRulesRequest(org_id="zeta"))
    assert list(other.rules) == []


@pytest.mark.parametrize("fields", [
    {"channel": pb.CHANNEL_STREAM, "webhook_url": ""},
    {"webhook_url": "http://localhost:8080/hook"},
    {"webhook_url": "http://127.0.0.1:9/hook"},
    {"types": list(pb.NotificationType.values())[1:], "cooldown_seconds": 604_800},
    {"channel": pb.CHANNEL_EMAIL, "webhook_url": "", "email_to": "ops+alerts@acme.co.uk"},
])
async def test_every_channel_with_its_target_is_accepted(
        notifier: Notifier, fields: dict[str, Any]) -> None:
    created = await create(notifier, "ok-1", a_rule(**fields))
    for name, value in fields.items():
        assert getattr(created, name) == value


# --- idempotency ------------------------------------------------------------------------------


async def test_a_create_replay_returns_the_rule_first_created_even_after_an_update(
        notifier: Notifier, sql: asyncpg.Connection) -> None:
    first = await create(notifier, "c-1", a_rule())
    await update(notifier, "u-1", a_rule(rule_id=first.rule_id, cooldown_seconds=5),
                 "cooldown_seconds")
    again = await create(notifier, "c-1", a_rule())
    assert again == first, "the replay answers what the first call answered"
    assert await written(sql) == (1, 2, 0)


async def test_a_reused_create_id_with_another_payload_is_already_exists_and_writes_nothing(
        notifier: Notifier, sql: asyncpg.Connection) -> None:
    await create(notifier, "c-1", a_rule())
    before = await written(sql)
    error = await refused(create(notifier, "c-1", a_rule(cooldown_seconds=1)))
    assert error.reason is Reason.IDEMPOTENCY_KEY_REUSED and error.field == "request_id"
    assert status_of(error) is grpc.StatusCode.ALREADY_EXISTS
    assert await written(sql) == before


async def test_the_same_request_id_in_two_orgs_makes_two_rules(notifier: Notifier) -> None:
    ours = await create(notifier, "shared-id", a_rule())
    theirs = await create(notifier, "shared-id", a_rule(org="zeta"))
    assert ours.rule_id != theirs.rule_id and theirs.org_id == "zeta"


async def test_concurrent_creates_with_one_request_id_make_one_rule(
        notifier: Notifier, sql: asyncpg.Connection) -> None:
    made = await asyncio.gather(*(create(notifier, "race", a_rule()) for _ in range(8)))
    assert len({r.rule_id for r in made}) == 1
    assert (await written(sql))[0] == 1


# --- update -----------------------------------------------------------------------------------


async def test_an_update_changes_only_the_masked_fields(notifier: Notifier) -> None:
    created = await create(notifier, "c-1", a_rule())
    change = pb.AlertRule(org_id=ORG, rule_id=created.rule_id, cooldown_seconds=30,
                          webhook_url="https://elsewhere.example/hook")  # not in the mask
    updated = await update(notifier, "u-1", change, "cooldown_seconds")
    assert updated.cooldown_seconds == 30 and updated.webhook_url == HOOK
    assert updated.created_at == created.created_at
    assert updated.updated_at.ToDatetime() > created.updated_at.ToDatetime()
    # a replay answers the same; the values outside the mask are not part of the request
    change.webhook_url = "https://ignored.example/hook"
    assert await update(notifier, "u-1", change, "cooldown_seconds") == updated
    reused = await refused(update(notifier, "u-1", a_rule(rule_id=created.rule_id,
                                                          cooldown_seconds=31),
                                  "cooldown_seconds"))
    assert reused.reason is Reason.IDEMPOTENCY_KEY_REUSED
    got = await notifier.client.notifier.GetAlertRule(
        pb.GetAlertRuleRequest(org_id=ORG, rule_id=created.rule_id))
    assert got.rule == updated


async def test_an_update_without_a_mask_replaces_every_writable_field(notifier: Notifier
                                                                      ) -> None:
    created = await create(notifier, "c-1", a_rule())
    replacement = pb.AlertRule(org_id=ORG, rule_id=created.rule_id,
                               types=[pb.NOTIFICATION_TYPE_HARD_LIMIT_HIT],
                               channel=pb.CHANNEL_STREAM)
    updated = await update(notifier, "u-1", replacement)
    assert list(updated.types) == [pb.NOTIFICATION_TYPE_HARD_LIMIT_HIT]
    assert updated.channel == pb.CHANNEL_STREAM and updated.webhook_url == ""
    assert (updated.cooldown_seconds, updated.low_balance_threshold_micros) == (0, 0)
    assert not updated.enabled and updated.rule_id == created.rule_id


async def test_switching_channel_must_clear_the_old_target(notifier: Notifier) -> None:
    created = await create(notifier, "c-1", a_rule())
    to_email = a_rule(rule_id=created.rule_id, channel=pb.CHANNEL_EMAIL, webhook_url="",
                      email_to="ops@acme.example")
    error = await refused(update(notifier, "u-1", to_email, "channel", "email_to"))
    assert [v.field for v in error.violations] == ["rule.webhook_url"]
    updated = await update(notifier, "u-1", to_email, "channel", "email_to", "webhook_url")
    assert (updated.channel, updated.email_to, updated.webhook_url) == (
        pb.CHANNEL_EMAIL, "ops@acme.example", "")


async def test_an_update_mask_naming_no_writable_field_is_refused(notifier: Notifier) -> None:
    created = await create(notifier, "c-1", a_rule())
    error = await refused(update(notifier, "u-1", a_rule(rule_id=created.rule_id),
                                 "created_at", "colour"))
    assert [v.field for v in error.violations] == ["update_mask", "update_mask"]
    assert "output only" in error.violations[0].description


# --- bad input --------------------------------------------------------------------------------


async def test_a_bad_rule_names_every_bad_field_and_writes_nothing(
        notifier: Notifier, sql: asyncpg.Connection) -> None:
    bad = pb.AlertRule(
        org_id="x" * 129,
        types=[pb.NOTIFICATION_TYPE_BUDGET_THRESHOLD, pb.NOTIFICATION_TYPE_UNSPECIFIED,
               pb.NOTIFICATION_TYPE_BUDGET_THRESHOLD, 99],
        channel=pb.CHANNEL_WEBHOOK, webhook_url="http://hooks.example.com/plain",
        email_to="ops@acme.example", cooldown_seconds=604_801,
        low_balance_threshold_micros=5)
    error = await refused(create(notifier, "", bad))
    assert error.reason is Reason.INVALID_ARGUMENT
    assert status_of(error) is grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for v in error.violations] == [
        "request_id", "rule.org_id", "rule.types[1]", "rule.types[2]", "rule.types[3]",
        "rule.webhook_url", "rule.email_to", "rule.cooldown_seconds",
        "rule.low_balance_threshold_micros"]
    assert "https://" in error.violations[5].description
    assert await written(sql) == (0, 0, 0)


@pytest.mark.parametrize(("fields", "field"), [
    ({"types": [], "low_balance_threshold_micros": 0}, "rule.types"),
    ({"types": [pb.NOTIFICATION_TYPE_LOW_BALANCE] * 10}, "rule.types"),
    ({"channel": pb.CHANNEL_UNSPECIFIED}, "rule.channel"),
    ({"webhook_url": ""}, "rule.webhook_url"),
    ({"webhook_url": "ftp://hooks.example.com/x"}, "rule.webhook_url"),
    ({"webhook_url": "https:///no-host"}, "rule.webhook_url"),
    ({"webhook_url": "https://hooks.example.com:99999/x"}, "rule.webhook_url"),
    ({"webhook_url": "https://hooks.example.com/a b"}, "rule.webhook_url"),
    ({"webhook_url": "https://x.example/" + "a" * 2048}, "rule.webhook_url"),
    ({"channel": pb.CHANNEL_EMAIL, "webhook_url": "", "email_to": ""}, "rule.email_to"),
    ({"channel": pb.CHANNEL_EMAIL, "webhook_url": "", "email_to": "ops"}, "rule.email_to"),
    ({"channel": pb.CHANNEL_EMAIL, "webhook_url": "", "email_to": "a@b.example, c@d.example"},
     "rule.email_to"),
    ({"channel": pb.CHANNEL_EMAIL, "email_to": "a@b.example"}, "rule.webhook_url"),
    ({"channel": pb.CHANNEL_STREAM}, "rule.webhook_url"),
    ({"channel": pb.CHANNEL_STREAM, "webhook_url": "", "email_to": "a@b.example"},
     "rule.email_to"),
    ({"cooldown_seconds": -1}, "rule.cooldown_seconds"),
    ({"low_balance_threshold_micros": -1}, "rule.low_balance_threshold_micros"),
    ({"types": [pb.NOTIFICATION_TYPE_PAYMENT_FAILED]}, "rule.low_balance_threshold_micros"),
    ({"org_id": ""}, "rule.org_id"),
])
async def test_each_bad_field_is_named(notifier: Notifier, sql: asyncpg.Connection,
                                       fields: dict[str, Any], field: str) -> None:
    error = await refused(create(notifier, "bad-1", a_rule(**fields)))
    assert error.reason is Reason.INVALID_ARGUMENT
    assert [v.field for v in error.violations] == [field]
    assert await written(sql) == (0, 0, 0)
    # the refused id stays free
    assert (await create(notifier, "bad-1", a_rule())).rule_id


async def test_an_update_into_a_bad_rule_writes_nothing(
        notifier: Notifier, sql: asyncpg.Connection) -> None:
    created = await create(notifier, "c-1", a_rule())
    before = await written(sql)
    error = await refused(update(notifier, "u-1", a_rule(
        rule_id=created.rule_id, types=[pb.NOTIFICATION_TYPE_PAYMENT_FAILED]), "types"))
    assert [v.field for v in error.violations] == ["rule.low_balance_threshold_micros"]
    assert await written(sql) == before
    got = await notifier.client.notifier.GetAlertRule(
        pb.GetAlertRuleRequest(org_id=ORG, rule_id=created.rule_id))
    assert got.rule == created


# --- not found and delete ---------------------------------------------------------------------


async def test_unknown_and_foreign_rules_are_not_found(notifier: Notifier) -> None:
    created = await create(notifier, "c-1", a_rule())
    n = notifier.client.notifier
    for call, field in [
        (n.GetAlertRule(pb.GetAlertRuleRequest(org_id=ORG, rule_id="rule_nope")), "rule_id"),
        (n.GetAlertRule(pb.GetAlertRuleRequest(org_id="zeta", rule_id=created.rule_id)),
         "rule_id"),
        (n.DeleteAlertRule(pb.DeleteAlertRuleRequest(
            request_id="d-1", org_id="zeta", rule_id=created.rule_id)), "rule_id"),
        (update(notifier, "u-1", a_rule(rule_id="rule_nope")), "rule.rule_id"),
    ]:
        error = await refused(call)
        assert error.reason is Reason.NOT_FOUND and error.field == field
        assert status_of(error) is grpc.StatusCode.NOT_FOUND
    error = await refused(n.GetAlertRule(pb.GetAlertRuleRequest(org_id="", rule_id="")))
    assert [v.field for v in error.violations] == ["org_id", "rule_id"]


async def test_a_deleted_rule_is_gone_and_a_replay_of_the_delete_succeeds(
        notifier: Notifier, sql: asyncpg.Connection) -> None:
    n = notifier.client.notifier
    created = await create(notifier, "c-1", a_rule())
    kept = await create(notifier, "c-2", a_rule())
    for state in ("PENDING", "RETRYING", "DELIVERED", "DEAD_LETTERED"):
        await sql.execute(
            "INSERT INTO notifier.deliveries (delivery_id, notification_id, rule_id, org_id, "
            "type, channel, state) VALUES ($1, $1, $2, $3, 'low_balance', 'webhook', $4)",
            f"dlv-{state}", created.rule_id, ORG, state)
    delete = pb.DeleteAlertRuleRequest(request_id="d-1", org_id=ORG, rule_id=created.rule_id)
    await n.DeleteAlertRule(delete)
    await n.DeleteAlertRule(delete)  # a replay succeeds again

    error = await refused(n.GetAlertRule(
        pb.GetAlertRuleRequest(org_id=ORG, rule_id=created.rule_id)))
    assert error.reason is Reason.NOT_FOUND
    listed = await n.ListAlertRules(pb.ListAlertRulesRequest(org_id=ORG))
    assert [r.rule_id for r in listed.rules] == [kept.rule_id]
    again = await refused(n.DeleteAlertRule(pb.DeleteAlertRuleRequest(
        request_id="d-2", org_id=ORG, rule_id=created.rule_id)))
    assert again.reason is Reason.NOT_FOUND and again.field == "rule_id"
    reused = await refused(n.DeleteAlertRule(pb.DeleteAlertRuleRequest(
        request_id="d-1", org_id=ORG, rule_id=kept.rule_id)))
    assert reused.reason is Reason.IDEMPOTENCY_KEY_REUSED
    assert (await n.GetAlertRule(pb.GetAlertRuleRequest(org_id=ORG, rule_id=kept.rule_id)))
    row = await sql.fetchrow("SELECT deleted_at FROM notifier.alert_rules WHERE rule_id = $1",
                             created.rule_id)
    assert row is not None and row["deleted_at"] is not None, "soft delete: the row stays"
    left = await sql.fetch("SELECT state FROM notifier.deliveries ORDER BY state")
    assert [r["state"] for r in left] == ["DEAD_LETTERED", "DELIVERED"], (
        "pending deliveries of a deleted rule are dropped, the log of the others stays")
    error = await refused(update(notifier, "u-1", a_rule(rule_id=created.rule_id)))
    assert error.reason is Reason.NOT_FOUND


# --- webhook signing secrets ------------------------------------------------------------------


async def test_rotation_keeps_the_old_secret_valid_for_the_overlap_only(
        notifier: Notifier, sql: asyncpg.Connection) -> None:
    secrets = WebhookSecrets(db.create_engine(notifier.db_url))  # what the sender reads
    try:
        original = await secrets.signing_secret(ORG)
        assert original.startswith("whsec_")
        assert await secrets.signing_secret(ORG) == original, "created once, then reused"

        n = notifier.client.notifier
        rotate = pb.RotateWebhookSecretRequest(request_id="r-1", org_id=ORG,
                                               overlap_seconds=3600)
        before = datetime.now(UTC)
        rotated = await n.RotateWebhookSecret(rotate)
        assert rotated.secret.startswith("whsec_") and rotated.secret != original
        until = rotated.previous_valid_until.ToDatetime(tzinfo=UTC)
        assert before + timedelta(seconds=3590) < until < datetime.now(UTC) + timedelta(hours=1)

        assert await secrets.signing_secret(ORG) == rotated.secret
        assert await secrets.valid_secrets(ORG, datetime.now(UTC)) == [rotated.secret, original]
        assert await secrets.valid_secrets(ORG, until - timedelta(seconds=1)) == [
            rotated.secret, original]
        assert await secrets.valid_secrets(ORG, until) == [rotated.secret]
        assert await secrets.valid_secrets(ORG, until + timedelta(days=30)) == [rotated.secret]
        assert await secrets.valid_secrets("zeta", datetime.now(UTC)) == []

        assert await n.RotateWebhookSecret(rotate) == rotated, "a replay shows the same secret"
        assert (await written(sql))[2] == 2
        reused = await refused(n.RotateWebhookSecret(pb.RotateWebhookSecretRequest(
            request_id="r-1", org_id=ORG, overlap_seconds=60)))
        assert reused.reason is Reason.IDEMPOTENCY_KEY_REUSED
        assert status_of(reused) is grpc.StatusCode.ALREADY_EXISTS

        # the default overlap is 24 h; a third secret retires the second, not the first again
        third = await n.RotateWebhookSecret(pb.RotateWebhookSecretRequest(
            request_id="r-2", org_id=ORG))
        left = third.previous_valid_until.ToDatetime(tzinfo=UTC) - datetime.now(UTC)
        assert timedelta(hours=23, minutes=59) < left <= timedelta(hours=24)
        assert await secrets.valid_secrets(ORG, datetime.now(UTC)) == [
            third.secret, rotated.secret, original]
        assert await secrets.valid_secrets(ORG, until + timedelta(seconds=1)) == [
            third.secret, rotated.secret]
    finally:
        await secrets.engine.dispose()


async def test_a_first_rotation_has_no_previous_secret(notifier: Notifier) -> None:
    rotated = await notifier.client.notifier.RotateWebhookSecret(
        pb.RotateWebhookSecretRequest(request_id="r-1", org_id=ORG))
    assert rotated.secret_id and rotated.secret.startswith("whsec_")
    assert not rotated.HasField("previous_valid_until")


async def test_a_bad_rotation_names_every_field_and_writes_nothing(
        notifier: Notifier, sql: asyncpg.Connection) -> None:
    error = await refused(notifier.client.notifier.RotateWebhookSecret(
        pb.RotateWebhookSecretRequest(request_id="", org_id="", overlap_seconds=604_801)))
    assert [v.field for v in error.violations] == ["request_id", "org_id", "overlap_seconds"]
    assert await written(sql) == (0, 0, 0)


async def test_concurrent_first_signing_secrets_agree(notifier: Notifier) -> None:
    secrets = WebhookSecrets(db.create_engine(notifier.db_url))
    try:
        found = await asyncio.gather(*(secrets.signing_secret(ORG) for _ in range(8)))
        assert len(set(found)) == 1
        assert await secrets.valid_secrets(ORG, datetime.now(UTC)) == [found[0]]
    finally:
        await secrets.engine.dispose()


# --- the CLI ----------------------------------------------------------------------------------


async def test_tally_alerts_creates_lists_shows_rotates_and_deletes(
        notifier: Notifier, capsys: pytest.CaptureFixture[str]) -> None:
    env = dict(os.environ, TALLY_NOTIFIER_PORT=str(notifier.config.notifier_port))
    env.pop("TALLY_NOTIFIER_ADDRESS", None)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tally.cli.main", "alerts", "create", "--org", ORG,
        "--type", "low-balance", "--type", "payment-failed", "--channel", "webhook",
        "--webhook-url", HOOK, "--cooldown", "300", "--low-balance-below", "12.5",
        "--request-id", "cli-1", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(CLI_TIMEOUT_S):
        out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    printed = out.decode()
    assert "types     low-balance,payment-failed" in printed
    assert f"channel   webhook {HOOK}" in printed
    assert "fires     below 12.5 credits" in printed and "cooldown  300s" in printed

    config = notifier.config
    (created,) = await alerts_cli.list_rules(config, ORG)
    assert created.low_balance_threshold_micros == 12_500_000
    assert list(created.types) == [pb.NOTIFICATION_TYPE_LOW_BALANCE,
                                   pb.NOTIFICATION_TYPE_PAYMENT_FAILED]
    listed = capsys.readouterr().out
    (line,) = [x for x in listed.splitlines() if x.startswith(created.rule_id)]
    assert "low-balance,payment-failed" in line and "(below 12.5 credits, cooldown 300s)" in line
    assert "1 alert rule(s)" in listed

    change, paths = alerts_cli.rule_fields(org=ORG, rule_id=created.rule_id, enabled=False)
    assert paths == ["enabled"]
    assert not (await alerts_cli.update_rule(config, change, paths)).enabled
    assert "(disabled)" in capsys.readouterr().out

    rotated = await alerts_cli.rotate_secret(config, ORG, overlap_seconds=60)
    shown = capsys.readouterr().out
    assert rotated.secret in shown and "not shown again" in shown

    await alerts_cli.delete_rule(config, ORG, created.rule_id)
    assert f"deleted {created.rule_id}" in capsys.readouterr().out
    with pytest.raises(typer.Exit):
        await alerts_cli.get_rule(config, ORG, created.rule_id)
    assert capsys.readouterr().err.startswith("NOT_FOUND: rule_id: no alert rule")
    for bad in ("0.0000001", "lots"):
        with pytest.raises(typer.BadParameter):
            alerts_cli.rule_fields(org=ORG, low_balance_below=bad)
    with pytest.raises(typer.BadParameter):
        alerts_cli.rule_fields(org=ORG, types=["low-ballance"])
