"""Secrets at rest: envelope encryption under a key-encryption key (KEK) from the environment.

Each sealed value has its own random data key (AES-256-GCM); the data key is stored wrapped
by the current KEK (AES-256-GCM too, the KEK's id as associated data), beside the ciphertext:

    tlyenc1:<kek id>:<base64 nonce + wrapped data key>:<base64 nonce + ciphertext>

The keyring comes from TALLY_KEK, or the file TALLY_KEK_FILE names (a mounted Secret):
`id:base64-of-32-bytes[,id:base64...]`, the first being current. Rotating the KEK without
downtime: put the new key first and keep the old one after it (every replica can then open
both), run `tally keys rotate-kek` (re-wraps each stored data key under the new KEK; the
ciphertexts are not touched), then drop the old key. A value that is not sealed (written
before a KEK was configured) opens as itself and is sealed by the next rotate-kek.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

PREFIX: Final = "tlyenc1"
_NONCE: Final = 12
_DATA_AAD: Final = b"tally-secret"


class SecretsError(Exception):
    """A keyring that cannot be read, or a value that cannot be opened with it."""


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text.encode())


def parse_keyring(raw: str) -> dict[str, bytes]:
    """`id:base64[,id:base64...]` -> {id: 32-byte key}, in order (the first is current)."""
    keys: dict[str, bytes] = {}
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        kek_id, sep, encoded = entry.partition(":")
        try:
            key = base64.b64decode(encoded, validate=True) if sep else b""
        except ValueError:
            key = b""
        if not kek_id or len(key) != 32 or ":" in kek_id:
            raise SecretsError(f"bad KEK entry {kek_id or entry[:8]!r}: expected "
                               "id:<base64 of 32 bytes>")
        keys[kek_id] = key
    if not keys:
        raise SecretsError("the keyring is empty")
    return keys


@dataclass(frozen=True)
class Sealer:
    """Seals and opens secrets with a keyring (the first key is the current KEK)."""

    keys: Mapping[str, bytes]

    @property
    def current(self) -> str:
        """The id of the KEK new values are wrapped with."""
        return next(iter(self.keys))

    def seal(self, plaintext: str) -> str:
        """The sealed form of `plaintext` (a fresh data key every time)."""
        data_key = AESGCM.generate_key(bit_length=256)
        nonce = os.urandom(_NONCE)
        sealed = AESGCM(data_key).encrypt(nonce, plaintext.encode(), _DATA_AAD)
        return f"{PREFIX}:{self.current}:{self._wrap(data_key)}:{_b64(nonce + sealed)}"

    def _wrap(self, data_key: bytes) -> str:
        nonce = os.urandom(_NONCE)
        wrapped = AESGCM(self.keys[self.current]).encrypt(nonce, data_key,
                                                          self.current.encode())
        return _b64(nonce + wrapped)

    def _data_key(self, kek_id: str, wrapped: str) -> bytes:
        kek = self.keys.get(kek_id)
        if kek is None:
            raise SecretsError(f"value sealed under KEK {kek_id!r}, which is not in the "
                               "keyring")
        raw = _unb64(wrapped)
        try:
            return AESGCM(kek).decrypt(raw[:_NONCE], raw[_NONCE:], kek_id.encode())
        except InvalidTag:
            raise SecretsError(f"the data key does not open with KEK {kek_id!r}") from None

    def open(self, value: str) -> str:
        """The plaintext of a sealed value (a value never sealed is returned as it is)."""
        if not value.startswith(PREFIX + ":"):
            return value
        _, kek_id, wrapped, body = value.split(":", 3)
        raw = _unb64(body)
        try:
            return AESGCM(self._data_key(kek_id, wrapped)).decrypt(
                raw[:_NONCE], raw[_NONCE:], _DATA_AAD).decode()
        except InvalidTag:
            raise SecretsError("a sealed value was altered") from None

    def rewrap(self, value: str) -> str | None:
        """`value` with its data key wrapped by the current KEK (a plaintext one sealed), or
        None if it already is."""
        if not value.startswith(PREFIX + ":"):
            return self.seal(value)
        _, kek_id, wrapped, body = value.split(":", 3)
        if kek_id == self.current:
            return None
        return f"{PREFIX}:{self.current}:{self._wrap(self._data_key(kek_id, wrapped))}:{body}"


def sealer_from_env(environ: Mapping[str, str] | None = None) -> Sealer | None:
    """The Sealer of TALLY_KEK (or the file TALLY_KEK_FILE), or None when neither is set."""
    env = os.environ if environ is None else environ
    raw = env.get("TALLY_KEK", "")
    path = env.get("TALLY_KEK_FILE", "")
    if not raw and path:
        raw = Path(path).read_text()
    return Sealer(parse_keyring(raw)) if raw.strip() else None


@dataclass(frozen=True, slots=True)
class SealedColumn:
    """Where sealed secrets are stored: a text column, or a text field of a jsonb column
    (`json_field`, dotted for a nested one: `body.webhook_url`)."""

    table: str
    key: tuple[str, ...]
    column: str
    json_field: str | None = None
    where: str = "TRUE"
    """Which rows hold a secret there (e.g. only webhook deliveries' targets)."""


SEALED_COLUMNS: Final = (
    SealedColumn("notifier.webhook_secrets", ("org_id", "secret_id"), "secret"),
    SealedColumn("notifier.admin_requests", ("request_id",), "result", "secret"),
    # a chat webhook's URL (Slack, Teams, Discord) is its credential
    SealedColumn("notifier.alert_rules", ("rule_id",), "body", "webhook_url"),
    SealedColumn("notifier.admin_requests", ("request_id",), "result", "body.webhook_url"),
    SealedColumn("notifier.deliveries", ("delivery_id",), "target",
                 where="channel = 'webhook'"),
)
"""Every stored secret, for `tally keys rotate-kek`. Not here because not stored: API keys
(accounts keeps a SHA-256 digest, never the key), payment-provider credentials and webhook
signing secrets (TALLY_LEDGER_STRIPE_SECRET_KEY[_FILE], TALLY_LEDGER_WEBHOOK_SECRETS[_FILE]:
a mounted Secret, read at start), OIDC (the kit verifies tokens against public JWKS: no
client secret), the local payment provider's signing secret (in memory, or from the same
setting). tests/auth/test_secrets_at_rest.py scans every table for plaintext."""


async def rewrap_all(conn: object, sealer: Sealer) -> int:
    """Re-wraps every stored secret under the current KEK (sealing any still in plaintext);
    each row updated only if unchanged since it was read, so it runs beside live traffic.
    Returns how many values were rewritten. `conn`: an asyncpg connection."""
    import asyncpg

    assert isinstance(conn, asyncpg.Connection)
    changed = 0
    for place in SEALED_COLUMNS:
        keys = ", ".join(place.key)
        path = "{" + ",".join((place.json_field or "").split(".")) + "}"
        value = f"{place.column} #>> '{path}'" if place.json_field else place.column
        rows = await conn.fetch(f"SELECT {keys}, {value} AS value FROM {place.table} "
                                f"WHERE {value} <> '' AND ({place.where})")
        for row in rows:
            fresh = sealer.rewrap(row["value"])
            if fresh is None:
                continue
            match = " AND ".join(f"{k} = ${i + 3}" for i, k in enumerate(place.key))
            target = (f"{place.column} = jsonb_set({place.column}, '{path}', "
                      "to_jsonb($1::text))" if place.json_field else f"{place.column} = $1")
            status = await conn.execute(
                f"UPDATE {place.table} SET {target} WHERE {value} = $2 AND {match}",
                fresh, row["value"], *(row[k] for k in place.key))
            changed += status.endswith(" 1")
    return changed
