"""`tally quote` against a real pricing server: the CLI process prints what Quote answers."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import sys

import pytest
import typer

from tally.cli import pricing as pricing_cli
from tally.common.v1 import common_pb2
from tally.kit.config import load_kit_config
from tally.pricing.v1 import pricing_pb2 as pb
from tally.rating import Meter
from tests.pricing.conftest import pricing_server, quantity

CLI_TIMEOUT_S = 60


async def test_tally_quote_prints_the_total_and_lines_that_quote_returns(db_url: str) -> None:
    async with pricing_server(db_url) as (running, stub):
        expected = await stub.Quote(pb.QuoteRequest(
            model="o4-mini-latest", mode=common_pb2.USAGE_MODE_BATCH, quantities=[
                quantity(common_pb2.METER_INPUT_TOKENS, 12_345),
                quantity(common_pb2.METER_OUTPUT_TOKENS, 678),
                quantity(common_pb2.METER_CACHED_INPUT_TOKENS, 4_000),
                quantity(common_pb2.METER_REASONING_TOKENS, 910)]))
        env = dict(os.environ, TALLY_PRICING_PORT=str(running.port))
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tally.cli.main", "quote", "o4-mini-latest",
            "--input", "12345", "--output", "678", "--cached", "4000", "--reasoning", "910",
            "--mode", "batch", "--org", "acme", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        async with asyncio.timeout(CLI_TIMEOUT_S):
            out, err = await process.communicate()
    printed = out.decode()
    assert process.returncode == 0, err.decode()

    total = re.search(r"total .* credits \((\d+) micro-credits\)", printed)
    assert total is not None, printed
    assert int(total.group(1)) == expected.total_micros > 0
    assert f"price book v{expected.price_book_version}" in printed
    assert "o4-mini (openai), batch" in printed, "the alias resolved"
    meter_lines = [line for line in printed.splitlines() if " per " in line]
    assert len(meter_lines) == len(expected.lines) == 4
    for wire, shown in zip(expected.lines, meter_lines, strict=True):
        assert f" {wire.quantity} x " in shown and f" {wire.rate} per " in shown
        assert "tier 0 flat" in shown


async def test_tally_quote_names_the_reason_of_a_refusal(
    db_url: str, capsys: pytest.CaptureFixture[str],
) -> None:
    async with pricing_server(db_url) as (running, _):
        config = dataclasses.replace(load_kit_config({}), pricing_port=running.port)
        with pytest.raises(typer.Exit) as exited:
            await pricing_cli.quote(config, "no-such-model", {Meter.INPUT_TOKENS: 10})
    assert exited.value.exit_code == 1
    assert capsys.readouterr().err.startswith("UNKNOWN_MODEL: ")
