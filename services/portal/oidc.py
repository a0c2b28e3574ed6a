"""The portal as an OIDC relying party: authorization code with PKCE (S256), the code
exchanged at the provider's token endpoint, the ID token verified by the kit's verifier
(signature from the provider's JWKS, issuer, audience = our client id, expiry, nonce), and
refresh-token grants to keep the access token the services see fresh."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import httpx

from tally.kit.auth import OidcVerifier, unauthenticated

from .domain import LoginAttempt


@dataclass(frozen=True, slots=True)
class Tokens:
    """What a token endpoint answered."""

    subject: str
    access_token: str
    refresh_token: str
    expires_in_s: float


class OidcClient:
    """One provider, one client id."""

    def __init__(self, issuer: str, client_id: str, client_secret: str = "") -> None:
        self.issuer = issuer.rstrip("/")
        self.client_id = client_id
        self._secret = client_secret
        self._http = httpx.AsyncClient(timeout=10.0)
        self._verifier = OidcVerifier(self.issuer, client_id, ("RS256", "ES256"))
        self._discovery: dict[str, Any] | None = None

    async def _endpoints(self) -> dict[str, Any]:
        if self._discovery is None:
            reply = await self._http.get(f"{self.issuer}/.well-known/openid-configuration")
            reply.raise_for_status()
            self._discovery = dict(reply.json())
        return self._discovery

    async def authorization_url(self, attempt: LoginAttempt, redirect_uri: str) -> str:
        """Where to send the browser to sign in."""
        endpoint = (await self._endpoints())["authorization_endpoint"]
        query = urlencode({"response_type": "code", "client_id": self.client_id,
                           "redirect_uri": redirect_uri, "scope": "openid email profile",
                           "state": attempt.state, "nonce": attempt.nonce,
                           "code_challenge": attempt.challenge,
                           "code_challenge_method": "S256"})
        return f"{endpoint}?{query}"

    async def _token(self, form: dict[str, str]) -> dict[str, Any]:
        endpoint = (await self._endpoints())["token_endpoint"]
        form = {"client_id": self.client_id, **form}
        if self._secret:  # a confidential client authenticates with HTTP Basic
            reply = await self._http.post(endpoint, data=form,
                                          auth=(self.client_id, self._secret))
        else:
            reply = await self._http.post(endpoint, data=form)
        body = reply.json() if reply.headers.get("content-type", "").startswith(
            "application/json") else {}
        if reply.status_code != 200 or "access_token" not in body:
            raise unauthenticated(f"the identity provider refused the sign-in: "
                                  f"{body.get('error', reply.status_code)} "
                                  f"{body.get('error_description', '')}".strip())
        return dict(body)

    async def exchange(self, code: str, attempt: LoginAttempt, redirect_uri: str) -> Tokens:
        """The tokens for an authorization code, the ID token verified (nonce included)."""
        body = await self._token({"grant_type": "authorization_code", "code": code,
                                  "redirect_uri": redirect_uri,
                                  "code_verifier": attempt.verifier})
        claims = await self._verifier.verify(str(body.get("id_token", "")))
        if claims.get("nonce") != attempt.nonce:
            raise unauthenticated("ID token nonce does not match the sign-in attempt")
        return Tokens(str(claims["sub"]), str(body["access_token"]),
                      str(body.get("refresh_token", "")), float(body.get("expires_in", 300)))

    async def refresh(self, refresh_token: str) -> Tokens:
        """New tokens for a refresh token (the provider may rotate it)."""
        body = await self._token({"grant_type": "refresh_token",
                                  "refresh_token": refresh_token})
        claims = await self._verifier.verify(str(body.get("id_token", "")))
        return Tokens(str(claims["sub"]), str(body["access_token"]),
                      str(body.get("refresh_token", refresh_token)),
                      float(body.get("expires_in", 300)))

    async def close(self) -> None:
        await self._http.aclose()
        await self._verifier.close()
