"""scripts/dev_certs.py makes the Secrets the dev overlay mounts: valid objects, one per
service, each certificate naming its service first and signed by the CA beside it."""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

from cryptography import x509

from tests.deploy.test_k8s_policy import check_k8s, rendered_dev_secret_names

ROOT = Path(__file__).resolve().parents[2]


def _dev_certs():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("dev_certs", ROOT / "scripts" / "dev_certs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_dev_certificates_are_the_secrets_the_dev_overlay_mounts() -> None:
    made = _dev_certs().secrets("tally-dev", 30)
    assert [check_k8s.schema_errors(secret) for secret in made] == [[]] * len(made)
    assert {s["metadata"]["name"] for s in made} == rendered_dev_secret_names()
    for secret in made:
        data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
        cert = x509.load_pem_x509_certificate(data["tls.crt"])
        ca = x509.load_pem_x509_certificate(data["ca.crt"])
        cert.verify_directly_issued_by(ca)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        service = secret["metadata"]["name"].removeprefix("tally-").removesuffix("-tls")
        assert names.get_values_for_type(x509.DNSName)[0] == service
