"""Render a tokenizer's chat template into the sentinel form the device substitutes into."""

from __future__ import annotations

from typing import Any

from coalora.runtime.chat import SYSTEM, USER, ChatFormat


def chat_format_from_tokenizer(tokenizer: Any) -> ChatFormat | None:
    """``None`` when the tokenizer has no chat template (base models, encoders)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": USER}], tokenize=False, add_generation_prompt=True
    )
    try:
        with_system = tokenizer.apply_chat_template(
            [{"role": "system", "content": SYSTEM}, {"role": "user", "content": USER}],
            tokenize=False,
            add_generation_prompt=True,
        )
    except Exception:  # templates that refuse a system role
        with_system = None
    return ChatFormat(prompt=prompt, with_system=with_system)
