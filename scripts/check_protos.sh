#!/usr/bin/env bash
# Fails if the committed generated stubs differ from what scripts/gen_protos.sh produces now.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/gen_protos.sh >/dev/null 2>&1
if ! git diff --quiet --exit-code -- libs/tally libs/envoy || [ -n "$(git status --porcelain --untracked-files=all -- libs/tally libs/envoy | grep -E '_pb2|__init__' || true)" ]; then
  echo "generated stubs are stale: run 'make protos' and commit the result" >&2
  git status --short -- libs/tally libs/envoy >&2
  exit 1
fi
echo "generated stubs are fresh"
