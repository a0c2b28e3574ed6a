"""Config: typed, frozen, and a bad value names its variable and what it expects."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

from tally.kit.config import ConfigError, KitConfig, load_kit_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_load_from_an_empty_environment() -> None:
    config = load_kit_config({})
    assert config.database_url is None
    assert config.port_of("ledger") == 50053
    assert config.address_of("pricing") == "127.0.0.1:50051"


def test_values_are_parsed_to_their_types() -> None:
    config = load_kit_config(
        {
            "TALLY_LEDGER_PORT": "6000",
            "TALLY_MIGRATE_ON_START": "no",
            "TALLY_DATABASE_URL": "postgresql://u@h:5432/d",
            "TALLY_DATA_DIR": "/tmp/x",
        }
    )
    assert config.ledger_port == 6000
    assert config.migrate_on_start is False
    assert config.database_url == "postgresql://u@h:5432/d"
    assert config.data_dir == Path("/tmp/x")


def test_config_is_frozen() -> None:
    config = load_kit_config({})
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.ledger_port = 1  # type: ignore[misc]


def test_every_bad_variable_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        load_kit_config(
            {
                "TALLY_LEDGER_PORT": "seventy",
                "TALLY_LOG_LEVEL": "loud",
                "TALLY_DATABASE_URL": "mysql://x",
                "TALLY_SHUTDOWN_GRACE_SECONDS": "0",
            }
        )
    variables = [var for var, _ in caught.value.problems]
    assert variables == [
        "TALLY_DATABASE_URL",
        "TALLY_LOG_LEVEL",
        "TALLY_SHUTDOWN_GRACE_SECONDS",
        "TALLY_LEDGER_PORT",
    ]
    port_line = next(line for line in caught.value.lines() if "TALLY_LEDGER_PORT" in line)
    assert "expected a port 0-65535, got 'seventy'" in port_line


def test_port_out_of_range_is_refused() -> None:
    with pytest.raises(ConfigError, match="TALLY_PRICING_PORT"):
        load_kit_config({"TALLY_PRICING_PORT": "70000"})


def test_a_required_setting_that_is_missing_is_named() -> None:
    from tally.kit.config import parse_port, setting

    @dataclasses.dataclass(frozen=True)
    class Needs:
        port: int = setting("TALLY_NEEDED_PORT", parse_port, "a port")

    with pytest.raises(ConfigError) as caught:
        from tally.kit.config import load

        load(Needs, {})
    assert caught.value.problems == [("TALLY_NEEDED_PORT", "is required; expected a port")]


def test_a_service_with_a_bad_value_exits_with_one_line_naming_it() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "services.ledger"],
        env={"PATH": "/usr/bin:/bin", "TALLY_LEDGER_PORT": "abc"},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["config error: TALLY_LEDGER_PORT: expected a port 0-65535, got 'abc'"]
    assert isinstance(KitConfig, type)
