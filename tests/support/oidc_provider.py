"""A small OpenID Connect provider for tests: discovery, JWKS, and signed tokens.

Real HTTP (aiohttp on port 0), real keys (RSA 2048 from `cryptography`), real JWS (PyJWT), so
the kit's verifier is exercised exactly as against Keycloak or Dex: it reads the discovery
document, fetches the JWKS from `jwks_uri`, and checks signatures, issuer, audience and times.
`jwks_fetches` counts JWKS downloads, so a test can see a refresh happen (or not).
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

AUDIENCE = "tally"


@dataclass
class SigningKey:
    """One RSA key pair and its key id."""

    kid: str
    private: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048))

    def jwk(self) -> dict[str, Any]:
        """The public half as a JWK."""
        data: dict[str, Any] = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(
            self.private.public_key()))
        data.update(kid=self.kid, use="sig", alg="RS256")
        return data

    def public_pem(self) -> bytes:
        """The public key as PEM (what an HS256 key-confusion attack signs with)."""
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass
class OidcProvider:
    """Serves discovery and JWKS; mints tokens signed by its published (or other) keys."""

    published: list[SigningKey] = field(default_factory=lambda: [SigningKey("k1")])
    jwks_fetches: int = 0
    issuer: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> OidcProvider:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.issuer = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _discovery(self, request: web.Request) -> web.Response:
        return web.json_response({
            "issuer": self.issuer, "jwks_uri": f"{self.issuer}/jwks",
            "authorization_endpoint": f"{self.issuer}/authorize",
            "token_endpoint": f"{self.issuer}/token",
            "id_token_signing_alg_values_supported": ["RS256"],
        })

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_fetches += 1
        return web.json_response({"keys": [k.jwk() for k in self.published]})

    def claims(self, subject: str = "alice", **overrides: Any) -> dict[str, Any]:
        """Standard claims for `subject`, valid for five minutes."""
        now = int(time.time())
        claims: dict[str, Any] = {"iss": self.issuer, "aud": AUDIENCE, "sub": subject,
                                  "iat": now, "nbf": now, "exp": now + 300,
                                  "jti": secrets.token_hex(8)}
        claims.update(overrides)
        return {k: v for k, v in claims.items() if v is not None}

    def token(self, subject: str = "alice", *, key: SigningKey | None = None,
              **overrides: Any) -> str:
        """An RS256 token signed by `key` (the first published key by default)."""
        signer = key or self.published[0]
        return jwt.encode(self.claims(subject, **overrides), signer.private, algorithm="RS256",
                          headers={"kid": signer.kid})
