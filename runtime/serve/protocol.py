"""Reading OpenAI-style request bodies: every known field checked, with the error OpenAI gives.

Unknown fields are ignored (clients send extras); a known field of the wrong type or out of
range is an ``APIError`` naming it (HTTP 400, ``invalid_request_error``), so a bad request is
never a 500.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

MAX_STOP = 4
ROLES_SYSTEM = ("system", "developer")


class APIError(Exception):
    """An error answered as OpenAI does: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(
        self,
        message: str,
        *,
        status: int = 400,
        param: str | None = None,
        code: str | None = None,
        kind: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.param = param
        self.code = code
        self.kind = kind
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.kind,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class GenerationRequest:
    prompt: str
    system: str | None
    chat: bool
    max_tokens: int | None
    temperature: float
    top_p: float
    seed: int | None
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    model: str | None


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return (isinstance(x, (int, float)) and not isinstance(x, bool)) and math.isfinite(x)


def _type_name(x: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(x), "null" if x is None else "number" if _is_number(x) else type(x).__name__
    )


def body_object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise APIError(f"the request body must be a JSON object, got {_type_name(body)}")
    return body


def _optional(body: dict[str, Any], name: str) -> Any:
    return body.get(name)


def _number(
    body: dict[str, Any], name: str, default: float, lo: float, hi: float, *, open_lo: bool = False
) -> float:
    v = _optional(body, name)
    if v is None:
        return default
    if not _is_number(v):
        raise APIError(f"'{name}' must be a number, got {_type_name(v)}", param=name)
    if not (lo < v <= hi if open_lo else lo <= v <= hi):
        where = f"in ({lo:g}, {hi:g}]" if open_lo else f"between {lo:g} and {hi:g}"
        raise APIError(f"'{name}' must be {where}, got {v}", param=name)
    return float(v)


def _integer(body: dict[str, Any], name: str, lo: int | None = None) -> int | None:
    v = _optional(body, name)
    if v is None:
        return None
    if not _is_int(v):
        raise APIError(f"'{name}' must be an integer, got {_type_name(v)}", param=name)
    if lo is not None and v < lo:
        raise APIError(f"'{name}' must be at least {lo}, got {v}", param=name)
    return int(v)


def _boolean(body: dict[str, Any], name: str) -> bool:
    v = _optional(body, name)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise APIError(f"'{name}' must be true or false, got {_type_name(v)}", param=name)
    return v


def _string(body: dict[str, Any], name: str) -> str | None:
    v = _optional(body, name)
    if v is not None and not isinstance(v, str):
        raise APIError(f"'{name}' must be a string, got {_type_name(v)}", param=name)
    return v


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    v = _optional(body, "stop")
    if v is None:
        return ()
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise APIError("'stop' must be a string or an array of strings", param="stop")
    if len(v) > MAX_STOP:
        raise APIError(f"'stop' holds at most {MAX_STOP} sequences, got {len(v)}", param="stop")
    return tuple(s for s in v if s)


def _common(body: dict[str, Any]) -> dict[str, Any]:
    n = _integer(body, "n", lo=1)
    if n not in (None, 1):
        raise APIError("this server answers one choice per request ('n' must be 1)", param="n")
    if _optional(body, "logprobs") not in (None, False, 0):
        raise APIError("'logprobs' is not supported", param="logprobs")
    max_tokens = _integer(body, "max_completion_tokens", lo=1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", lo=1)
    stream_options = _optional(body, "stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise APIError("'stream_options' must be an object", param="stream_options")
    include_usage = _boolean(stream_options or {}, "include_usage")
    return dict(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, open_lo=True),
        seed=_integer(body, "seed"),
        stop=_stop(body),
        stream=_boolean(body, "stream"),
        include_usage=include_usage,
        model=_string(body, "model"),
    )


def _content(message: dict[str, Any], i: int) -> str:
    param = f"messages[{i}].content"
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise APIError("only text content parts are supported", param=param)
            text = part.get("text")
            if not isinstance(text, str):
                raise APIError("a text content part needs a 'text' string", param=param)
            parts.append(text)
        return "".join(parts)
    raise APIError("'content' must be a string or an array of text parts", param=param)


def chat_request(body: Any) -> GenerationRequest:
    """``/v1/chat/completions``: system (or developer) messages, then one user message.

    The bundle stores its chat template rendered for one turn (runtime/chat.py), so earlier
    turns cannot be rendered faithfully: a conversation with assistant turns is refused
    rather than silently flattened.
    """
    body = body_object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError("'messages' must be a non-empty array", param="messages")
    system: list[str] = []
    user: str | None = None
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise APIError(f"messages[{i}] must be an object", param=f"messages[{i}]")
        role = m.get("role")
        if not isinstance(role, str):
            raise APIError(f"messages[{i}].role must be a string", param=f"messages[{i}].role")
        text = _content(m, i)
        if role in ROLES_SYSTEM and user is None:
            system.append(text)
        elif role == "user" and user is None:
            user = text
        else:
            raise APIError(
                "this server serves single-turn chat: optional system messages, then one "
                f"user message (messages[{i}] has role {role!r})",
                param="messages",
            )
    if user is None:
        raise APIError("'messages' needs a user message", param="messages")
    return GenerationRequest(
        prompt=user, system="\n".join(system) if system else None, chat=True, **_common(body)
    )


def completion_request(body: Any) -> GenerationRequest:
    """``/v1/completions``: ``prompt`` is a string (or an array holding one string)."""
    body = body_object(body)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError("'prompt' must be a string", param="prompt")
    if _optional(body, "suffix") is not None:
        raise APIError("'suffix' is not supported", param="suffix")
    if _boolean(body, "echo"):
        raise APIError("'echo' is not supported", param="echo")
    return GenerationRequest(prompt=prompt, system=None, chat=False, **_common(body))


def classify_inputs(body: Any) -> list[str]:
    """``/v1/classify``: ``input`` is a string or an array of strings."""
    body = body_object(body)
    v = body.get("input")
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not v or not all(isinstance(s, str) for s in v):
        raise APIError("'input' must be a string or a non-empty array of strings", param="input")
    return v


class StopScanner:
    """Cuts generated text at the first stop sequence, holding back any tail that could be
    the start of one, so a stream never shows part of a stop sequence."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = stops
        self._buf = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        if self.stopped:
            return ""
        if not self.stops:
            return piece
        self._buf += piece
        hits = [(i, s) for s in self.stops if (i := self._buf.find(s)) >= 0]
        if hits:
            cut = min(i for i, _ in hits)
            out, self._buf, self.stopped = self._buf[:cut], "", True
            return out
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self._buf)), 0, -1):
                if self._buf.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        out = self._buf[: len(self._buf) - keep]
        self._buf = self._buf[len(out) :]
        return out

    def flush(self) -> str:
        out, self._buf = self._buf, ""
        return "" if self.stopped else out
