"""Where notifications go: signed webhooks and e-mail. Each sender raises SendFailed with a
short reason (HTTP status, SMTP reply, timeout) that lands in the delivery's last_error."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Protocol

import aiohttp
import aiosmtplib

from tally.kit import signing
from tally.kit.telemetry import trace_id_of

from .alerting import Notification
from .delivery_store import Delivery


class SendFailed(Exception):
    """An attempt failed; the message says how."""


class Sender(Protocol):
    """Delivers one notification through one channel."""

    async def send(self, delivery: Delivery, notification: Notification) -> None:
        """Returns once the receiver accepted it; raises SendFailed otherwise."""
        ...


class SigningSecrets(Protocol):
    """The org's webhook secrets in use (newest first)."""

    async def valid_secrets(self, org_id: str, at: datetime) -> list[str]:
        """Secrets an org's receivers accept at `at`."""
        ...

    async def signing_secret(self, org_id: str) -> str:
        """The org's current secret (made on first use)."""
        ...


def payload(notification: Notification) -> bytes:
    """The JSON body receivers get (stable keys; ids let them dedupe)."""
    return json.dumps({
        "id": notification.notification_id,
        "type": notification.type.value.upper(),
        "org_id": notification.org_id,
        "occurred_at": notification.occurred_at.isoformat(),
        "title": notification.title,
        "attributes": dict(notification.attributes),
        "source_event_id": notification.source_event_id,
        "trace_id": trace_id_of(notification.trace_id),
    }, sort_keys=True).encode()


class WebhookSender:
    """POSTs the notification, signed with every secret the org has in use."""

    SIGNATURE_HEADER = "Tally-Signature"

    def __init__(self, secrets: SigningSecrets, timeout_s: float = 10.0) -> None:
        self.secrets = secrets
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def send(self, delivery: Delivery, notification: Notification) -> None:
        """Delivered on a 2xx answer."""
        body = payload(notification)
        now = int(time.time())
        await self.secrets.signing_secret(delivery.org_id)  # an org's first webhook makes one
        keys = await self.secrets.valid_secrets(delivery.org_id, datetime.now(UTC))
        headers = {"Content-Type": "application/json",
                   self.SIGNATURE_HEADER: signing.sign(list(keys), now, body),
                   "Tally-Notification-Id": notification.notification_id}
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        try:
            async with self._session.post(delivery.target, data=body, headers=headers) as reply:
                if not 200 <= reply.status < 300:
                    raise SendFailed(f"HTTP {reply.status}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise SendFailed(f"{type(exc).__name__}: {exc}"[:300]) from exc

    async def close(self) -> None:
        """Closes the HTTP connections."""
        if self._session is not None:
            await self._session.close()


class EmailSender:
    """Sends the notification as a plain-text e-mail over SMTP."""

    def __init__(self, host: str, port: int, sender: str, timeout_s: float = 10.0) -> None:
        self.host, self.port, self.sender, self.timeout_s = host, port, sender, timeout_s

    async def send(self, delivery: Delivery, notification: Notification) -> None:
        """Delivered once the SMTP server accepted the message."""
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = delivery.target
        message["Subject"] = f"[Tally] {notification.title}"
        message["X-Tally-Notification-Id"] = notification.notification_id
        details = "\n".join(f"{k}: {v}" for k, v in sorted(notification.attributes.items()))
        message.set_content(f"{notification.title}\n\norg: {notification.org_id}\n"
                            f"when: {notification.occurred_at.isoformat()}\n{details}\n")
        try:
            await aiosmtplib.send(message, hostname=self.host, port=self.port,
                                  timeout=self.timeout_s)
        except (aiosmtplib.SMTPException, OSError, TimeoutError) as exc:
            raise SendFailed(f"SMTP: {exc}"[:300]) from exc
