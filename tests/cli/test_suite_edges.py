"""`tally up` starts the processes in front of the services (the gateway, the portal) one way
(suite._start_edge): it waits until they are ready, reuses one that is running, and a start
that fails says so with the tail of the process's log."""

from __future__ import annotations

import dataclasses
import os
import signal
import sys
from pathlib import Path

import pytest

from tally.cli import suite
from tally.kit.config import load_kit_config


def test_an_edge_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    config = dataclasses.replace(load_kit_config({}), data_dir=tmp_path)
    with pytest.raises(RuntimeError, match=r"(?s)edge-test exited with 3:\n.*boom"):
        suite._start_edge(config, "edge-test",
                          [sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
                          dict(os.environ), lambda: False)


def test_a_ready_edge_is_started_once_and_then_found_running(tmp_path: Path) -> None:
    config = dataclasses.replace(load_kit_config({}), data_dir=tmp_path)
    ready = tmp_path / "ready"
    program = (f"import pathlib, time; pathlib.Path({str(ready)!r}).touch(); "
               "time.sleep(120)")
    pid = suite._start_edge(config, "edge-ok", [sys.executable, "-c", program],
                            dict(os.environ), ready.exists)
    try:
        assert ready.exists()
        # running: not started again (the argv would fail at once if it were)
        assert suite._start_edge(config, "edge-ok", [sys.executable, "-c", "raise SystemExit(1)"],
                                 dict(os.environ), lambda: False) == pid
    finally:
        os.kill(pid, signal.SIGTERM)
        os.waitpid(pid, 0)
