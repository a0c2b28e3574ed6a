"""A real headless browser for tests of Tally's web pages: Debian's Chromium driven through
ChromeDriver by Selenium.

When Chromium or ChromeDriver is missing, the `chromium` fixture installs them with apt-get
(updating the package lists if the first try fails). If that is impossible the test fails
with the reason: a missing browser never turns into a skipped test.

Selenium calls block. Async tests must run them off the event loop (`asyncio.to_thread`),
because the servers under test answer the browser from that very loop.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.webdriver.chrome.service import Service

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
APT_TIMEOUT_S = 900
PAGE_LOAD_TIMEOUT_S = 30


def _installed() -> bool:
    return all(os.access(path, os.X_OK) for path in (CHROMIUM, CHROMEDRIVER))


def _apt_get(*args: str) -> subprocess.CompletedProcess[str]:
    as_root = [] if os.geteuid() == 0 else ["sudo", "-n"]
    try:
        return subprocess.run([*as_root, "apt-get", *args], capture_output=True, text=True,
                              timeout=APT_TIMEOUT_S, check=False,
                              env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except (OSError, subprocess.TimeoutExpired) as exc:
        return subprocess.CompletedProcess(args, returncode=-1, stdout="", stderr=str(exc))


@pytest.fixture(scope="session")
def chromium() -> Path:
    """The Chromium binary, with a matching ChromeDriver beside it (installed if missing)."""
    if _installed():
        return CHROMIUM
    if os.geteuid() != 0 and shutil.which("sudo") is None:
        pytest.fail(f"{CHROMIUM} or {CHROMEDRIVER} is missing, and installing them needs root "
                    f"(no sudo): run `apt-get install -y chromium chromium-driver`")
    install = ("install", "-y", "chromium", "chromium-driver")
    result = _apt_get(*install)
    if result.returncode != 0:  # stale package lists are the usual reason
        update = _apt_get("update")
        result = _apt_get(*install) if update.returncode == 0 else update
    if result.returncode != 0 or not _installed():
        output = (result.stderr or result.stdout).strip()[-2000:]
        pytest.fail(f"could not install chromium and chromium-driver with apt-get "
                    f"(exit {result.returncode}):\n{output}")
    return CHROMIUM


@pytest.fixture
def browser(chromium: Path) -> Iterator[webdriver.Chrome]:
    """A fresh headless Chromium session, quit after the test."""
    options = webdriver.ChromeOptions()
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,900"):
        options.add_argument(argument)
    options.binary_location = str(chromium)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(PAGE_LOAD_TIMEOUT_S)
    try:
        yield driver
    finally:
        driver.quit()
