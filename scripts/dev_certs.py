#!/usr/bin/env python3
"""Prints the Secrets the dev overlay's mTLS needs: a throwaway CA and one certificate per
service, as `kubernetes.io/tls` Secrets `tally-<service>-tls` (tls.crt, tls.key, ca.crt).

Each certificate's first subject alternative name is the service's name, which is who it is
to the other services (TALLY_AUTH_SERVICES); its other names are the Service's DNS names, so
peers dialling `ledger:50053` verify the server they reach. Keys never touch the disk; the CA
key is discarded once the certificates are signed (run again to re-issue everything, e.g. at
expiry). For anything beyond a development cluster, issue them with cert-manager or the
mesh instead.

    .venv/bin/python scripts/dev_certs.py [--namespace tally-dev] [--days 90] | kubectl apply -f -
"""

from __future__ import annotations

import argparse
import base64
import datetime
import sys

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVICES = ("pricing", "metering", "ledger", "notifier", "accounts", "portal")
"""The five services and the portal (a client of theirs, with an identity of its own)."""


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def secrets(namespace: str, days: int) -> list[dict[str, object]]:
    """The six Secrets, certificates signed by a CA made for this run."""
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(_name("tally-dev-ca"))
          .issuer_name(_name("tally-dev-ca")).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(start)
          .not_valid_after(end)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .sign(ca_key, hashes.SHA256()))
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    made: list[dict[str, object]] = []
    for service in SERVICES:
        key = ec.generate_private_key(ec.SECP256R1())
        names = [service, f"{service}.{namespace}", f"{service}.{namespace}.svc",
                 f"{service}.{namespace}.svc.cluster.local"]
        cert = (x509.CertificateBuilder().subject_name(_name(service))
                .issuer_name(ca.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(start)
                .not_valid_after(end)
                .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]),
                               critical=False)
                # each service is a server to its callers and a client of its peers
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        data = {"tls.crt": cert.public_bytes(serialization.Encoding.PEM), "tls.key": _pem(key),
                "ca.crt": ca_pem}
        made.append({
            "apiVersion": "v1", "kind": "Secret", "type": "kubernetes.io/tls",
            "metadata": {"name": f"tally-{service}-tls", "namespace": namespace,
                         "labels": {"app.kubernetes.io/name": service,
                                    "app.kubernetes.io/part-of": "tally"}},
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()}})
    return made


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--namespace", default="tally-dev")
    parser.add_argument("--days", type=int, default=90, help="validity of every certificate")
    args = parser.parse_args()
    yaml.safe_dump_all(secrets(args.namespace, args.days), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
