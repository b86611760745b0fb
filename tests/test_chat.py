from __future__ import annotations

import pytest

from coalora.export.chat import chat_format_from_tokenizer
from coalora.runtime.chat import ChatFormat

CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are helpful<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_rendering_matches_the_template_engine() -> None:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0}, "a")))
    tok.chat_template = CHATML
    fmt = chat_format_from_tokenizer(tok)
    assert fmt is not None
    for user, system in [("Hi {there} \\n", None), ("Q?", "Be brief.")]:
        msgs = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": user}
        ]
        want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert fmt.render(user, system) == want
    again = ChatFormat.from_dict(fmt.to_dict())
    assert again == fmt


def test_bad_chat_format() -> None:
    assert ChatFormat.from_dict(None) is None
    with pytest.raises(ValueError):
        ChatFormat.from_dict({"prompt": "no marker"})
