"""The notifier's webhook signing secrets are stored sealed under the KEK, signed with in
plaintext, and `tally keys rotate-kek` re-wraps them under a new KEK beside live reads."""

from __future__ import annotations

import asyncio
import base64
import os
import sys
from datetime import UTC, datetime, timedelta

import asyncpg

from services.notifier.domain import IdempotentWrite, new_signing_secret
from services.notifier.store import WebhookSecrets
from tally.kit import db
from tally.kit.secrets import PREFIX, Sealer, parse_keyring


def ring(kek_id: str) -> str:
    return f"{kek_id}:{base64.b64encode(os.urandom(32)).decode()}"


async def test_secrets_are_sealed_at_rest_and_rotate_kek_rewraps_them(db_url: str) -> None:
    old, new = ring("old"), ring("new")
    secrets = WebhookSecrets(db.create_engine(db_url), Sealer(parse_keyring(old)))
    current = await secrets.signing_secret("acme")
    rotation = await secrets.rotate(
        IdempotentWrite("RotateWebhookSecret", "acme", "r1", "h"), timedelta(hours=1),
        new_signing_secret())
    assert await secrets.valid_secrets("acme", datetime.now(UTC)) == [rotation.secret,
                                                                      current]
    conn = await asyncpg.connect(db.asyncpg_url(db_url))
    try:
        stored = await conn.fetch("SELECT secret FROM notifier.webhook_secrets")
        replay = await conn.fetchval("SELECT result->>'secret' FROM notifier.admin_requests")
        assert all(r["secret"].startswith(f"{PREFIX}:old:") for r in stored)
        assert current not in str(stored) and rotation.secret not in str(stored)
        assert replay.startswith(f"{PREFIX}:old:")

        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tally.cli.main", "keys", "rotate-kek",
            env=dict(os.environ, TALLY_DATABASE_URL=db_url, TALLY_KEK=f"{new},{old}"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await process.communicate()
        assert process.returncode == 0, err.decode()
        assert "re-wrapped 3 secrets under KEK 'new'" in out.decode()
        stored = await conn.fetch("SELECT secret FROM notifier.webhook_secrets")
        assert all(r["secret"].startswith(f"{PREFIX}:new:") for r in stored)
    finally:
        await conn.close()
    only_new = WebhookSecrets(db.create_engine(db_url), Sealer(parse_keyring(new)))
    assert await only_new.signing_secret("acme") == rotation.secret
