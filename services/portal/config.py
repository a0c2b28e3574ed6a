"""The portal's settings (TALLY_PORTAL_*)."""

from __future__ import annotations

from dataclasses import dataclass

from tally.kit.config import parse_bool, parse_port, parse_positive_int, setting


@dataclass(frozen=True, slots=True)
class PortalConfig:
    """Where the portal listens and how people sign in."""

    port: int = setting("TALLY_PORTAL_PORT", parse_port, "a port 0-65535", default=8700)
    public_url: str = setting("TALLY_PORTAL_PUBLIC_URL", str,
                              "the portal's external base URL, e.g. https://portal.example",
                              default="")
    oidc_issuer: str = setting("TALLY_PORTAL_OIDC_ISSUER", str,
                               "the OIDC provider's issuer URL", default="")
    oidc_client_id: str = setting("TALLY_PORTAL_OIDC_CLIENT_ID", str,
                                  "the portal's OIDC client id", default="tally")
    oidc_client_secret: str = setting("TALLY_PORTAL_OIDC_CLIENT_SECRET", str,
                                      "the client secret (empty: a public PKCE client)",
                                      default="", secret=True)
    dev_sign_in: bool = setting("TALLY_PORTAL_DEV_SIGN_IN", parse_bool,
                                "true to sign in by name without a provider (development)",
                                default=False)
    session_ttl_s: int = setting("TALLY_PORTAL_SESSION_TTL_S", parse_positive_int,
                                 "seconds a session lives", default=8 * 3600)

    custom_min_minor: int = setting("TALLY_PORTAL_CUSTOM_MIN_MINOR", parse_positive_int,
                                    "smallest custom credit purchase, minor units (e.g. cents)",
                                    default=500)
    custom_max_minor: int = setting("TALLY_PORTAL_CUSTOM_MAX_MINOR", parse_positive_int,
                                    "largest custom credit purchase, minor units",
                                    default=1_000_000)
    redis_sessions: bool = setting("TALLY_PORTAL_REDIS_SESSIONS", parse_bool,
                                   "keep sessions in Redis (TALLY_REDIS_URL) so several "
                                   "replicas share them", default=True)

    def base_url(self, port: int) -> str:
        """The portal's own base URL (configured, else the local address)."""
        return (self.public_url or f"http://127.0.0.1:{port}").rstrip("/")

    @property
    def secure_cookies(self) -> bool:
        """Cookies are Secure when the portal is reached over TLS."""
        return self.public_url.startswith("https://")
