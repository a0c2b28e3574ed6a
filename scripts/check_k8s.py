#!/usr/bin/env python3
"""Renders every kustomization under k8s/ and validates each object against the Kubernetes API.

Each target (k8s/base and every k8s/overlays/<name>) is rendered with `kubectl kustomize`, and
every rendered object is checked by kubernetes-validate against the OpenAPI schema of
KUBERNETES_VERSION in strict mode: an unknown or misspelt field is an error, not ignored.
Exits non-zero naming every object that fails. tests/deploy reuses `targets`, `render` and
`schema_errors` for its policy checks.

    .venv/bin/python scripts/check_k8s.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Final

import kubernetes_validate
import yaml

ROOT: Final = Path(__file__).resolve().parent.parent
K8S: Final = ROOT / "k8s"
KUBERNETES_VERSION: Final = "1.37.0"
"""The newest schema kubernetes-validate 1.37 ships; the oldest cluster we target is 1.29
(native sidecars for Linkerd)."""

Document = dict[str, Any]


class RenderError(Exception):
    """kubectl is missing, or `kubectl kustomize` failed."""


def targets() -> dict[str, Path]:
    """The kustomizations to check: "base" and each overlay, by name."""
    found = {"base": K8S / "base"}
    overlays = K8S / "overlays"
    for path in sorted(overlays.iterdir()) if overlays.is_dir() else []:
        if (path / "kustomization.yaml").is_file():
            found[path.name] = path
    return found


def kubectl() -> str:
    """The kubectl binary (kubectl on PATH, else /usr/bin/kubectl)."""
    found = shutil.which("kubectl") or (
        "/usr/bin/kubectl" if Path("/usr/bin/kubectl").exists() else None)
    if found is None:
        raise RenderError(
            "kubectl not found (looked on PATH and at /usr/bin/kubectl): it renders the "
            "kustomizations under k8s/; install it "
            "(https://kubernetes.io/docs/tasks/tools/) and run again")
    return found


def render(path: Path) -> list[Document]:
    """The objects `kubectl kustomize path` produces, in its order."""
    result = subprocess.run([kubectl(), "kustomize", str(path)], capture_output=True,
                            text=True, check=False)
    if result.returncode != 0:
        raise RenderError(f"kubectl kustomize {path} failed:\n{result.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc is not None]


def describe(doc: Document) -> str:
    """Kind/name, for messages."""
    return f"{doc.get('kind', '?')}/{doc.get('metadata', {}).get('name', '?')}"


def schema_errors(doc: Document, version: str = KUBERNETES_VERSION) -> list[str]:
    """Why `doc` is not a valid object of Kubernetes `version` (empty when it is)."""
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(part) for part in exc.path) or "(top level)"
        return [f"{describe(doc)}: {where}: {exc.message}"]
    except kubernetes_validate.SchemaNotFoundError:
        return [f"{describe(doc)}: no schema for {doc.get('apiVersion')} {doc.get('kind')} "
                f"in Kubernetes {version}"]
    return []


def check(name: str, path: Path) -> list[str]:
    """Every problem of one kustomization: render failure or invalid objects."""
    try:
        docs = render(path)
    except RenderError as exc:
        return [str(exc)]
    if not docs:
        return [f"{path} renders no objects"]
    return [error for doc in docs for error in schema_errors(doc)]


def main() -> int:
    """Checks every target; prints one line per target and every error."""
    try:
        kubectl()
    except RenderError as exc:
        print(f"check_k8s: {exc}", file=sys.stderr)
        return 2
    failed = False
    for name, path in targets().items():
        errors = check(name, path)
        if errors:
            failed = True
            print(f"FAIL {path.relative_to(ROOT)}", file=sys.stderr)
            for error in errors:
                print(f"  {error}", file=sys.stderr)
        else:
            count = len(render(path))
            print(f"ok   {path.relative_to(ROOT)}: {count} objects valid for Kubernetes "
                  f"{KUBERNETES_VERSION}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
