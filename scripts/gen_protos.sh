#!/usr/bin/env bash
# Generates the Python stubs (messages, gRPC, and mypy-protobuf .pyi) for every contract under
# protos/ into libs/, where the import path equals the proto package (tally.ledger.v1, ...).
# Deterministic: stale outputs are deleted first and inputs are passed in a fixed order, so two
# runs produce identical files.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PYTHON="${PYTHON:-.venv/bin/python}"
PACKAGES=(common pricing metering ledger notifier accounts)

# protoc finds protoc-gen-mypy / protoc-gen-mypy_grpc (from mypy-protobuf) on PATH.
PATH="$(dirname "${PYTHON}"):${PATH}"
export PATH

# Remove previous outputs so a deleted or renamed proto leaves nothing behind.
for pkg in "${PACKAGES[@]}"; do
  rm -f libs/tally/"${pkg}"/v1/*_pb2*.py libs/tally/"${pkg}"/v1/*_pb2*.pyi
done

# Vendored third-party contracts (Envoy's rate-limit service, see third_party/envoy/README.md):
# generated the same way, outside our buf module.
VENDORED=third_party/envoy
rm -rf libs/envoy

mapfile -t PROTOS < <(find protos -name '*.proto' -type f | LC_ALL=C sort)
if [[ ${#PROTOS[@]} -eq 0 ]]; then
  echo "gen_protos: no .proto files under protos/" >&2
  exit 1
fi

"${PYTHON}" -m grpc_tools.protoc \
  -I protos \
  --python_out=libs \
  --grpc_python_out=libs \
  --mypy_out=libs \
  --mypy_grpc_out=libs \
  "${PROTOS[@]}"

mapfile -t VENDORED_PROTOS < <(cd "${VENDORED}" && find envoy -name '*.proto' -type f | LC_ALL=C sort)
"${PYTHON}" -m grpc_tools.protoc \
  -I "${VENDORED}" \
  --python_out=libs \
  --grpc_python_out=libs \
  --mypy_out=libs \
  --mypy_grpc_out=libs \
  "${VENDORED_PROTOS[@]}"
while IFS= read -r dir; do
  [[ -e "${dir}/__init__.py" ]] || : > "${dir}/__init__.py"
done < <(find libs/envoy -type d | LC_ALL=C sort)

# Package markers (libs/tally/__init__.py is owned by the kit, not by this script).
for pkg in "${PACKAGES[@]}"; do
  for dir in libs/tally/"${pkg}" libs/tally/"${pkg}"/v1; do
    mkdir -p "${dir}"
    [[ -e "${dir}/__init__.py" ]] || : > "${dir}/__init__.py"
  done
done

echo "gen_protos: generated ${#PROTOS[@]} + ${#VENDORED_PROTOS[@]} vendored proto files into libs/"
