"""Who is calling: the request's API key (`Authorization: Bearer tly_...`, what the openai
package sends as its api_key) resolved to the org, project, environment and key id it was
issued for, from a local copy of accounts' credentials feed (the kit's CredentialCache, the
same one every Tally service verifies keys with: no call per request).

Headers add what a key does not say: `x-tally-label-<name>: <value>` labels (label budgets),
`openai-project` / `x-tally-project` the project when the key is not bound to one; the body's
`user` is the end user.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final

from tally.kit.auth import API_KEY_PREFIX, CredentialCache
from tally.kit.errors import Reason, TallyError

LABEL_HEADER: Final = "x-tally-label-"
MAX_LABELS: Final = 16


@dataclass(frozen=True, slots=True)
class Caller:
    """The Tally context of one request."""

    org_id: str
    project_id: str
    environment: str
    api_key_id: str
    labels: Mapping[str, str] = field(default_factory=dict)


def caller_of(credentials: CredentialCache, headers: Mapping[str, str]) -> Caller:
    """The caller, or UNAUTHENTICATED / INVALID_ARGUMENT saying why not."""
    scheme, _, secret = headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secret.startswith(API_KEY_PREFIX):
        raise TallyError(Reason.UNAUTHENTICATED, "send your Tally API key as "
                         "'Authorization: Bearer tly_...' (the openai package's api_key)")
    key = credentials.key(secret.strip())
    asked = headers.get("x-tally-project") or headers.get("openai-project") or ""
    if key.project_id and asked and asked != key.project_id:
        raise TallyError(Reason.PERMISSION_DENIED, f"API key {key.key_id} is limited to "
                         f"project {key.project_id!r}, not {asked!r}", field="project")
    labels = {name[len(LABEL_HEADER):]: value for name, value in headers.items()
              if name.startswith(LABEL_HEADER) and len(name) > len(LABEL_HEADER)}
    if len(labels) > MAX_LABELS:
        raise TallyError(Reason.INVALID_ARGUMENT, f"at most {MAX_LABELS} labels",
                         field="x-tally-label-*")
    return Caller(key.org_id, key.project_id or asked, key.environment_id, key.key_id, labels)
