"""A small OpenID Connect provider for tests: discovery, JWKS, signed tokens, and the
authorization code flow with PKCE (S256 only) and refresh tokens, for browser sign-in.

Real HTTP (aiohttp on port 0), real keys (RSA 2048 from `cryptography`), real JWS (PyJWT), so
the kit's verifier is exercised exactly as against Keycloak or Dex: it reads the discovery
document, fetches the JWKS from `jwks_uri`, and checks signatures, issuer, audience and times.
`jwks_fetches` counts JWKS downloads, so a test can see a refresh happen (or not).

Sign-in: `GET /authorize` shows a form asking who signs in (no passwords: a test provider);
submitting it redirects to the client's registered `redirect_uri` with a one-time `code`.
`POST /token` exchanges the code once, only with the `code_verifier` whose S256 digest is the
challenge, the same client and redirect URI, and within `code_ttl_s`; a `refresh_token` grant
rotates the refresh token (the old one stops working).
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlencode

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
class _Grant:
    """An issued authorization code (or refresh token) and what it was issued for."""

    subject: str
    client_id: str
    redirect_uri: str = ""
    challenge: str = ""
    nonce: str = ""
    expires_at: float = 0.0


def s256(verifier: str) -> str:
    """The PKCE S256 challenge of `verifier`."""
    digest = hashlib.sha256(verifier.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclass
class OidcProvider:
    """Serves discovery and JWKS; mints tokens signed by its published (or other) keys."""

    published: list[SigningKey] = field(default_factory=lambda: [SigningKey("k1")])
    jwks_fetches: int = 0
    issuer: str = ""
    clients: dict[str, str] = field(default_factory=dict)
    """Registered clients: client_id -> its one redirect URI (exact match)."""
    code_ttl_s: float = 60.0
    token_ttl_s: int = 300
    _codes: dict[str, _Grant] = field(default_factory=dict)
    _refresh: dict[str, _Grant] = field(default_factory=dict)
    _runner: web.AppRunner | None = None

    async def start(self) -> OidcProvider:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self._discovery)
        app.router.add_get("/jwks", self._jwks)
        app.router.add_get("/authorize", self._authorize_form)
        app.router.add_post("/authorize", self._authorize)
        app.router.add_post("/token", self._token)
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
            "response_types_supported": ["code"],
            "grant_types_supported": ["authorization_code", "refresh_token"],
            "code_challenge_methods_supported": ["S256"],
            "token_endpoint_auth_methods_supported": ["none"],
        })

    def register(self, client_id: str, redirect_uri: str) -> None:
        """Registers a (public, PKCE) client and its redirect URI."""
        self.clients[client_id] = redirect_uri

    def _authorization_error(self, params: Any) -> str | None:
        client_id = params.get("client_id", "")
        if client_id not in self.clients:
            return "unknown client_id"
        if params.get("redirect_uri") != self.clients[client_id]:
            return "redirect_uri is not the one registered for this client"
        if params.get("response_type") != "code":
            return "response_type must be code"
        if params.get("code_challenge_method") != "S256" or not params.get("code_challenge"):
            return "PKCE with code_challenge_method S256 is required"
        return None

    async def _authorize_form(self, request: web.Request) -> web.Response:
        error = self._authorization_error(request.query)
        if error:
            return web.Response(status=400, text=error)
        hidden = "".join(
            f'<input type="hidden" name="{html.escape(k)}" value="{html.escape(v)}">'
            for k, v in request.query.items())
        page = ("<!doctype html><html lang=en><title>Test identity provider</title>"
                "<h1>Sign in (test provider)</h1><form method=post action=/authorize>"
                f"{hidden}<label for=username>User</label> "
                "<input id=username name=username autocomplete=username required> "
                "<button id=sign-in type=submit>Sign in</button></form></html>")
        return web.Response(text=page, content_type="text/html")

    async def _authorize(self, request: web.Request) -> web.Response:
        form = await request.post()
        error = self._authorization_error(form)
        subject = str(form.get("username", "")).strip()
        if error or not subject:
            return web.Response(status=400, text=error or "username is required")
        code = secrets.token_urlsafe(24)
        self._codes[code] = _Grant(subject, str(form["client_id"]), str(form["redirect_uri"]),
                                   str(form["code_challenge"]), str(form.get("nonce", "")),
                                   time.monotonic() + self.code_ttl_s)
        query = {"code": code, **({"state": str(form["state"])} if form.get("state") else {})}
        raise web.HTTPFound(f"{form['redirect_uri']}?{urlencode(query)}")

    async def _token(self, request: web.Request) -> web.Response:
        form = await request.post()
        grant_type = form.get("grant_type")
        if grant_type == "authorization_code":
            grant = self._codes.pop(str(form.get("code", "")), None)  # one use, even failed
            if grant is None or grant.expires_at < time.monotonic():
                return _token_error("invalid_grant", "unknown, used or expired code")
            if (form.get("client_id") != grant.client_id
                    or form.get("redirect_uri") != grant.redirect_uri):
                return _token_error("invalid_grant", "client or redirect_uri differs")
            if s256(str(form.get("code_verifier", ""))) != grant.challenge:
                return _token_error("invalid_grant", "code_verifier does not match")
        elif grant_type == "refresh_token":
            grant = self._refresh.pop(str(form.get("refresh_token", "")), None)
            if grant is None or form.get("client_id") != grant.client_id:
                return _token_error("invalid_grant", "unknown or used refresh token")
        else:
            return _token_error("unsupported_grant_type", str(grant_type))
        refresh = secrets.token_urlsafe(24)
        self._refresh[refresh] = _Grant(grant.subject, grant.client_id)
        exp = int(time.time()) + self.token_ttl_s
        id_claims = {"aud": grant.client_id, "exp": exp,
                     **({"nonce": grant.nonce} if grant.nonce else {})}
        return web.json_response({
            "token_type": "Bearer", "expires_in": self.token_ttl_s,
            "access_token": self.token(grant.subject, exp=exp),
            "id_token": self.token(grant.subject, **id_claims),
            "refresh_token": refresh})

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


def _token_error(error: str, description: str) -> web.Response:
    return web.json_response({"error": error, "error_description": description}, status=400)
