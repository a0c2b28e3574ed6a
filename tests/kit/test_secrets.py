"""Envelope encryption of secrets at rest: sealed with a fresh data key, opened, tamper
detected, re-wrapped under a new KEK without touching the ciphertext."""

from __future__ import annotations

import base64
import os

import pytest

from tally.kit.secrets import PREFIX, Sealer, SecretsError, parse_keyring, sealer_from_env


def keyring(*ids: str) -> str:
    return ",".join(f"{i}:{base64.b64encode(os.urandom(32)).decode()}" for i in ids)


def test_a_sealed_secret_opens_and_never_shows_its_plaintext() -> None:
    sealer = Sealer(parse_keyring(keyring("k1")))
    sealed = sealer.seal("whsec_abc123")
    assert sealed.startswith(f"{PREFIX}:k1:") and "whsec_abc123" not in sealed
    assert sealer.open(sealed) == "whsec_abc123"
    assert sealer.seal("whsec_abc123") != sealed  # a fresh data key and nonce every time


def test_an_altered_value_or_a_missing_kek_refuses_to_open() -> None:
    sealer = Sealer(parse_keyring(keyring("k1")))
    sealed = sealer.seal("secret")
    head, body = sealed.rsplit(":", 1)
    raw = bytearray(base64.urlsafe_b64decode(body))
    raw[-1] ^= 1
    with pytest.raises(SecretsError):
        sealer.open(f"{head}:{base64.urlsafe_b64encode(bytes(raw)).decode()}")
    with pytest.raises(SecretsError, match="not in the keyring"):
        Sealer(parse_keyring(keyring("k2"))).open(sealed)


def test_rotating_the_kek_rewraps_the_data_key_and_keeps_the_ciphertext() -> None:
    old_ring = parse_keyring(keyring("k1"))
    new_ring = parse_keyring(keyring("k2"))
    sealed = Sealer(old_ring).seal("secret")
    both = Sealer({**new_ring, **old_ring})
    rewrapped = both.rewrap(sealed)
    assert rewrapped is not None and rewrapped.startswith(f"{PREFIX}:k2:")
    assert rewrapped.rsplit(":", 1)[1] == sealed.rsplit(":", 1)[1]
    assert Sealer(new_ring).open(rewrapped) == "secret"
    assert both.rewrap(rewrapped) is None
    legacy = both.rewrap("stored-before-a-kek")
    assert legacy is not None and Sealer(new_ring).open(legacy) == "stored-before-a-kek"


@pytest.mark.parametrize("raw", ["", "k1", "k1:notbase64!", "k1:" + base64.b64encode(
    b"short").decode()])
def test_a_bad_keyring_is_refused(raw: str) -> None:
    with pytest.raises(SecretsError):
        parse_keyring(raw)


def test_the_keyring_comes_from_the_environment_or_a_file(tmp_path: object) -> None:
    ring = keyring("a", "b")
    assert sealer_from_env({}) is None
    sealer = sealer_from_env({"TALLY_KEK": ring})
    assert sealer is not None and sealer.current == "a"
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    (tmp_path / "kek").write_text(ring)
    from_file = sealer_from_env({"TALLY_KEK_FILE": str(tmp_path / "kek")})
    assert from_file is not None and from_file.current == "a"
