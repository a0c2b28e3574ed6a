"""Token counting shared by the fake upstream and the gateway's estimate: a word or a
punctuation mark is one token. Deterministic, so tests know exact counts; a real deployment
would use the model's tokenizer (tiktoken) for the estimate and the upstream's own usage for
the charge, which is what the gateway does."""

from __future__ import annotations

import re
from typing import Any, Final

_TOKEN: Final = re.compile(r"\w+|[^\w\s]")


def count(text: str) -> int:
    """Tokens in `text`."""
    return len(_TOKEN.findall(text))


def content_text(content: Any) -> str:
    """The text of a chat message's content: a string, or OpenAI's list of parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """Tokens of a chat prompt: every message's role and content."""
    return sum(count(str(m.get("role", ""))) + count(content_text(m.get("content")))
               for m in messages)
