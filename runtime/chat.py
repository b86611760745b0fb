"""Chat prompts on the device without a template engine.

The exporter renders the model's chat template once with sentinel strings in place of the
user and system messages (``export/chat.py``); the bundle stores those renderings, and the
device only substitutes text. This covers single-turn chat, which is what ``coalora-run``
serves.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

USER = "\x00USER\x00"
SYSTEM = "\x00SYSTEM\x00"
_MARKERS = re.compile(f"({re.escape(USER)}|{re.escape(SYSTEM)})")


@dataclass(frozen=True)
class ChatFormat:
    prompt: str  # rendering with the template's default system message, USER in place
    with_system: str | None = None  # rendering with SYSTEM and USER in place

    def segments(self, user: str, system: str | None = None) -> list[tuple[str, bool]]:
        """The rendering as (text, from_caller) pieces, in order. The template is split on its
        markers once, so text the caller gives is never scanned again (a system message that
        holds the user marker stays as written), and the tokenizer can keep the caller's text
        from ever becoming control tokens."""
        template = self.prompt
        if system is not None and self.with_system is not None:
            template = self.with_system
        fill = {USER: user, SYSTEM: system or ""}
        pieces: list[tuple[str, bool]] = []
        for part in _MARKERS.split(template):
            if part in fill:
                pieces.append((fill[part], True))
            elif part:
                pieces.append((part, False))
        return pieces

    def render(self, user: str, system: str | None = None) -> str:
        return "".join(text for text, _ in self.segments(user, system))

    def to_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "with_system": self.with_system}

    @classmethod
    def from_dict(cls, data: Any) -> ChatFormat | None:
        if not data:
            return None
        prompt = data.get("prompt") if isinstance(data, dict) else None
        if not isinstance(prompt, str) or USER not in prompt:
            raise ValueError("chat format must hold a 'prompt' rendering with the user marker")
        with_system = data.get("with_system")
        if with_system is not None and (SYSTEM not in with_system or USER not in with_system):
            with_system = None
        return cls(prompt=prompt, with_system=with_system)
