#!/usr/bin/env bash
# Regenerates the lock files from pyproject.toml: every package pinned, with hashes, for every
# platform Python >= 3.11 runs on. Run it on purpose (after changing a dependency or to take
# upstream releases), then `./dev setup`, `make protos` and the tests, and commit the result.
#   requirements/runtime.lock   what the container image installs
#   requirements/dev.lock       ./dev setup and CI: runtime + embedded servers + dev tools
# Keeps every pin that still satisfies pyproject.toml; `scripts/lock.sh --upgrade` takes the newest
# allowed releases, `--upgrade-package NAME` moves one.
set -euo pipefail
cd "$(dirname "$0")/.."
UV="${UV:-.venv/bin/uv}"
[ -x "$UV" ] || UV=uv
# The build backend is locked too, so `pip install --no-build-isolation .` builds with it.
build_requires() {
  python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))'
}
common=(--universal --python-version 3.11 --generate-hashes --no-header --quiet)
build_requires | "$UV" pip compile pyproject.toml - "${common[@]}" "$@" -o requirements/runtime.lock
build_requires | "$UV" pip compile pyproject.toml - --extra dev "${common[@]}" "$@" -o requirements/dev.lock
echo "lock: requirements/runtime.lock, requirements/dev.lock"
