"""The OpenAI request bodies ``kvcl serve`` accepts, checked field by field.

Every refusal is a :class:`RequestError` naming the field (``param``), answered as
``{"error": {"message", "type", "param", "code"}}`` with a 4xx status, before the request
reaches the scheduler. Fields kvcl does not implement are refused when set to anything but
their neutral value (``n`` > 1, penalties, ``logprobs``, ``echo``), never silently ignored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["RequestError", "GenerationRequest", "parse_completion", "parse_chat", "MAX_STOP"]

MAX_STOP = 4   # OpenAI's limit on stop sequences


class RequestError(Exception):
    """A request refused before it ran: HTTP ``status``, the offending field in ``param``."""

    def __init__(self, message: str, param: "str | None" = None, status: int = 400,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.message, self.param, self.status, self.kind = message, param, status, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": None}}


@dataclass
class GenerationRequest:
    """A checked request: the prompt (text or ids) and how to continue it."""

    prompt_text: "str | None" = None          # completion text, or the rendered chat prompt
    prompt_ids: "list[int] | None" = None     # token ids given directly
    messages: "list[dict] | None" = None      # chat
    max_tokens: "int | None" = None           # None: as many as fit (capped by the server)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: "int | None" = None
    seed: "int | None" = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    model: "str | None" = None


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not (low <= v <= high):
        raise RequestError(f"{name}: expected a number in [{low}, {high}], got {v!r}", name)
    return float(v)


def _optional_int(body: dict, name: str, low: int) -> "int | None":
    v = body.get(name)
    if v is None:
        return None
    if not _is_int(v) or v < low:
        raise RequestError(f"{name}: expected an integer >= {low}, got {v!r}", name)
    return int(v)


def _neutral(body: dict, name: str, neutral: Any, what: str) -> None:
    v = body.get(name)
    if v is not None and v != neutral:
        raise RequestError(f"{name}: not supported by kvcl serve ({what}), got {v!r}", name)


def _common(body: Any, req: GenerationRequest, max_tokens_names: tuple) -> None:
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object", None)
    req.model = body.get("model") if isinstance(body.get("model"), str) else None
    req.stream = body.get("stream", False) is True
    if body.get("stream") not in (None, True, False):
        raise RequestError(f"stream: expected a boolean, got {body.get('stream')!r}", "stream")
    opts = body.get("stream_options")
    if opts is not None:
        if not isinstance(opts, dict):
            raise RequestError("stream_options: expected an object", "stream_options")
        req.include_usage = opts.get("include_usage") is True
    for name in max_tokens_names:
        v = _optional_int(body, name, 1)
        if v is not None:
            req.max_tokens = v
            break
    req.temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    req.top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if req.top_p == 0:
        raise RequestError("top_p: expected a number in (0, 1], got 0", "top_p")
    req.top_k = _optional_int(body, "top_k", 1)      # vLLM's extension; -1 there means off
    req.seed = _optional_int(body, "seed", 0)
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > MAX_STOP:
            raise RequestError(f"stop: expected a non-empty string or a list of up to {MAX_STOP} of them, "
                               f"got {body.get('stop')!r}", "stop")
        req.stop = list(stop)
    ids = body.get("stop_token_ids")
    if ids is not None:
        if not isinstance(ids, list) or not all(_is_int(t) and t >= 0 for t in ids):
            raise RequestError(f"stop_token_ids: expected a list of token ids >= 0, got {ids!r}", "stop_token_ids")
        req.stop_token_ids = list(ids)
    _neutral(body, "n", 1, "one choice per request")
    _neutral(body, "best_of", 1, "one choice per request")
    _neutral(body, "presence_penalty", 0, "no penalties")
    _neutral(body, "frequency_penalty", 0, "no penalties")
    _neutral(body, "logit_bias", {}, "no logit bias")


def parse_completion(body: Any) -> GenerationRequest:
    """``POST /v1/completions``: ``prompt`` is a string or a list of token ids (one prompt)."""
    req = GenerationRequest(max_tokens=16)   # OpenAI's default for completions
    _common(body, req, ("max_tokens",))
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]                               # a batch of one
    if isinstance(p, str):
        if not p:
            raise RequestError("prompt: expected a non-empty string", "prompt")
        req.prompt_text = p
    elif isinstance(p, list) and p and all(_is_int(t) for t in p):
        if any(t < 0 for t in p):
            raise RequestError("prompt: token ids must be >= 0", "prompt")
        req.prompt_ids = list(p)
    elif isinstance(p, list) and len(p) > 1 and all(isinstance(x, (str, list)) for x in p):
        raise RequestError(f"prompt: one prompt per request in kvcl serve, got {len(p)}", "prompt")
    else:
        raise RequestError(f"prompt: expected a non-empty string or list of token ids, got {type(p).__name__}",
                           "prompt")
    _neutral(body, "echo", False, "no echo")
    _neutral(body, "logprobs", None, "no log-probabilities")
    _neutral(body, "suffix", None, "no suffix")
    return req


def parse_chat(body: Any) -> GenerationRequest:
    """``POST /v1/chat/completions``: ``messages`` rendered by the model's chat template."""
    req = GenerationRequest()
    _common(body, req, ("max_completion_tokens", "max_tokens"))
    from ..tokenizer import check_messages
    from ..errors import KvclError
    try:
        req.messages = check_messages(body.get("messages"))
    except KvclError as exc:
        raise RequestError(str(exc), "messages") from None
    _neutral(body, "logprobs", False, "no log-probabilities")
    _neutral(body, "tools", None, "no tool calls")
    return req
