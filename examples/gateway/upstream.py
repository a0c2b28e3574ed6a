"""A fake upstream model speaking OpenAI's HTTP API: deterministic answers with realistic
usage, so the gateway (and its tests) run without a provider.

- Chat: the answer's words come from a hash of the prompt (the same prompt, the same answer);
  `max_completion_tokens` / `max_tokens` cut it (finish_reason "length"). Usage: prompt
  tokens from the messages (tokens.py), completion tokens from the answer; with
  `reasoning_effort` it "thinks" (reasoning tokens, counted in completion tokens as OpenAI
  does); with `prompt_cache_key` the prompt's prefix (every message but the last) is a
  cache hit (cached tokens).
- Streaming: server-sent events, one chunk per word, then the usage chunk when
  `stream_options.include_usage`, then `data: [DONE]`.
- Embeddings: a vector per input from a hash of its text (`dimensions`, default 16), float or
  base64 (what the openai package asks for by default).

The gateway reaches it over HTTP like any OpenAI-compatible upstream; pointing
TALLY_GATEWAY_UPSTREAM_URL at a real one changes nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
from collections.abc import AsyncIterator
from typing import Any, Final

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from . import tokens

_WORDS: Final = ("tally", "credits", "meter", "budget", "quota", "ledger", "model", "token",
                 "request", "answer", "price", "usage", "balance", "stream", "receipt", "gateway")
REASONING: Final = {"minimal": 4, "low": 16, "medium": 64, "high": 256}
DEFAULT_DIMENSIONS: Final = 16
CREATED: Final = 1_767_225_600  # a fixed timestamp keeps answers byte-identical


def _digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def answer_words(prompt: str) -> list[str]:
    """The full answer to `prompt`: 8..47 words."""
    seed = _digest(prompt)
    return [_WORDS[b % len(_WORDS)] for b in seed[1: 1 + 8 + seed[0] % 40]]


def _chat(body: dict[str, Any]) -> tuple[list[str], str, dict[str, Any], str]:
    messages = body["messages"]
    prompt = json.dumps(messages, sort_keys=True)
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    reasoning = min(REASONING.get(str(body.get("reasoning_effort")), 0), limit or 1 << 30)
    words = answer_words(prompt)
    finish = "stop"
    if limit is not None and len(words) > limit - reasoning:
        words, finish = words[:max(limit - reasoning, 0)], "length"
    prompt_tokens = tokens.prompt_tokens(messages)
    cached = tokens.prompt_tokens(messages[:-1]) if body.get("prompt_cache_key") else 0
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words) + reasoning,
             "total_tokens": prompt_tokens + len(words) + reasoning,
             "prompt_tokens_details": {"cached_tokens": cached, "audio_tokens": 0},
             "completion_tokens_details": {"reasoning_tokens": reasoning, "audio_tokens": 0,
                                           "accepted_prediction_tokens": 0,
                                           "rejected_prediction_tokens": 0}}
    completion_id = "chatcmpl-" + _digest(prompt + str(limit)).hex()[:24]
    return words, finish, usage, completion_id


async def chat_completions(request: Request) -> Response:
    """POST /v1/chat/completions."""
    body = await request.json()
    words, finish, usage, completion_id = _chat(body)
    model = body["model"]
    if body.get("stream"):
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(_chunks(completion_id, model, words, finish, usage,
                                         include_usage), media_type="text/event-stream",
                                 headers={"x-request-id": completion_id})
    return JSONResponse({
        "id": completion_id, "object": "chat.completion", "created": CREATED, "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(words),
                                             "refusal": None},
                     "logprobs": None, "finish_reason": finish}],
        "usage": usage, "system_fingerprint": "fp_tally_fake"},
        headers={"x-request-id": completion_id})


async def _chunks(completion_id: str, model: str, words: list[str], finish: str,
                  usage: dict[str, Any], include_usage: bool) -> AsyncIterator[bytes]:
    def event(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": CREATED,
                 "model": model, "system_fingerprint": "fp_tally_fake", "choices": choices,
                 **extra}
        return f"data: {json.dumps(chunk)}\n\n".encode()

    yield event([{"index": 0, "delta": {"role": "assistant", "content": ""},
                  "finish_reason": None}])
    for i, word in enumerate(words):
        yield event([{"index": 0, "delta": {"content": word if i == 0 else " " + word},
                      "finish_reason": None}])
    yield event([{"index": 0, "delta": {}, "finish_reason": finish}])
    if include_usage:
        yield event([], usage=usage)
    yield b"data: [DONE]\n\n"


def _vector(text: str, dimensions: int) -> list[float]:
    raw = b"".join(_digest(f"{text}\x1f{i}") for i in range(dimensions // 32 + 1))
    return [round(b / 255 - 0.5, 6) for b in raw[:dimensions]]


def embedding_inputs(value: Any) -> list[str] | None:
    """The inputs of an embeddings request as texts (token arrays too), None when malformed."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return [" ".join(map(str, value))]
    if isinstance(value, list) and value and all(
            isinstance(v, str) or (isinstance(v, list) and all(isinstance(t, int) for t in v))
            for v in value):
        return [v if isinstance(v, str) else " ".join(map(str, v)) for v in value]
    return None


async def embeddings(request: Request) -> Response:
    """POST /v1/embeddings."""
    body = await request.json()
    texts = embedding_inputs(body["input"]) or []
    dimensions = int(body.get("dimensions") or DEFAULT_DIMENSIONS)
    data = []
    for i, text in enumerate(texts):
        vector = _vector(text, dimensions)
        encoded: Any = (base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
                        if body.get("encoding_format") == "base64" else vector)
        data.append({"object": "embedding", "index": i, "embedding": encoded})
    used = sum(tokens.count(t) for t in texts)
    return JSONResponse({"object": "list", "data": data, "model": body["model"],
                         "usage": {"prompt_tokens": used, "total_tokens": used}})


def build() -> Starlette:
    """The fake upstream's app."""
    return Starlette(routes=[Route("/v1/chat/completions", chat_completions, methods=["POST"]),
                             Route("/v1/embeddings", embeddings, methods=["POST"])])
