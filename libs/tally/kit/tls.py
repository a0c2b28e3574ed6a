"""Mutual TLS between services, from certificate files (reloaded when they change).

A server configured with TALLY_TLS_CERT, TALLY_TLS_KEY and TALLY_TLS_CLIENT_CA serves TLS only
and requires a client certificate signed by that CA; the guard (tally.kit.auth) then takes
the caller's identity from the verified certificate (its subject alternative name, else its
common name) and its roles from TALLY_AUTH_SERVICES. The files are read again whenever one of
them changes (cert-manager or a mounted Secret rotates them), checked on each new handshake:
no restart, and connections already open keep the certificate they began with.

A client (`tally.kit.channels.peer_channel`) presents TALLY_TLS_CERT/KEY and verifies the
server against TALLY_TLS_CA when they are set.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import grpc

from tally.kit.log import get_logger

log = get_logger("tally.kit.tls")

SETTINGS = ("TALLY_TLS_CERT", "TALLY_TLS_KEY", "TALLY_TLS_CA", "TALLY_TLS_CLIENT_CA")
"""The environment variables this module reads (paths of PEM files)."""


@dataclass(frozen=True, slots=True)
class TlsFiles:
    """Where a process's certificate, key and trusted CA live."""

    cert: Path
    key: Path
    ca: Path
    """Servers: the CA client certificates must chain to. Clients: the CA of servers."""

    def read(self) -> tuple[bytes, bytes, bytes]:
        """(certificate chain, private key, CA) as bytes."""
        return self.cert.read_bytes(), self.key.read_bytes(), self.ca.read_bytes()

    def stamp(self) -> tuple[float, ...]:
        """The files' modification times (a change means: read them again)."""
        return tuple(p.stat().st_mtime_ns for p in (self.cert, self.key, self.ca))


def server_files(environ: Mapping[str, str] | None = None) -> TlsFiles | None:
    """The server's TLS files from TALLY_TLS_CERT / _KEY / _CLIENT_CA, if configured."""
    env = os.environ if environ is None else environ
    names = ("TALLY_TLS_CERT", "TALLY_TLS_KEY", "TALLY_TLS_CLIENT_CA")
    values = [env.get(n, "") for n in names]
    if not any(values):
        return None
    if not all(values):
        missing = ", ".join(n for n, v in zip(names, values, strict=True) if not v)
        raise ValueError(f"TLS needs all of TALLY_TLS_CERT, TALLY_TLS_KEY and "
                         f"TALLY_TLS_CLIENT_CA; missing {missing}")
    return TlsFiles(*(Path(v) for v in values))


def client_files(environ: Mapping[str, str] | None = None) -> TlsFiles | None:
    """A client's TLS files from TALLY_TLS_CERT / _KEY / _CA, if configured."""
    env = os.environ if environ is None else environ
    values = [env.get(n, "") for n in ("TALLY_TLS_CERT", "TALLY_TLS_KEY", "TALLY_TLS_CA")]
    return TlsFiles(*(Path(v) for v in values)) if all(values) else None


def server_credentials(files: TlsFiles) -> grpc.ServerCredentials:
    """Server credentials requiring client certificates, re-read when the files change."""
    stamp = files.stamp()

    def configuration() -> grpc.ServerCertificateConfiguration:
        cert, key, ca = files.read()
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal stamp
        try:
            now = files.stamp()
            if now == stamp:
                return None
            fresh = configuration()
        except OSError as exc:  # mid-rotation: keep serving what we have
            log.warning("tls_reload_failed", error=str(exc))
            return None
        stamp = now
        log.info("tls_reloaded", cert=str(files.cert))
        return fresh

    # the stubs say the fetcher never returns None; gRPC documents None as "no change"
    return grpc.dynamic_ssl_server_credentials(configuration(), fetch,  # type: ignore[arg-type]
                                               require_client_authentication=True)


def channel_credentials(files: TlsFiles) -> grpc.ChannelCredentials:
    """Client credentials: our certificate, and the CA servers must chain to."""
    cert, key, ca = files.read()
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key,
                                        certificate_chain=cert)
