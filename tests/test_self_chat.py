"""The conversations the shipped model writes itself, and how they join training and
calibration (``export/self_chat``, ``export/phases``)."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from coalora.export.data import Batches, with_extra_rows
from coalora.export.models import LoadedModel, tiny_llama, tiny_tokenizer
from coalora.export.options import ExportError, ExportOptions
from coalora.export.phases import calibration_texts
from coalora.export.self_chat import SelfChatError, self_chat_texts
from tests.bundles import CHATML

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _loaded(template: str | None = CHATML) -> LoadedModel:
    torch.manual_seed(0)
    tok = tiny_tokenizer()
    tok.chat_template = template
    model = tiny_llama()
    # a random tiny model's greedy answer is all newlines, which is dropped as empty: with the
    # newline's logit at -inf it answers something
    (newline,) = tok("\n", add_special_tokens=False)["input_ids"]
    model.get_output_embeddings().register_forward_hook(
        lambda _m, _i, out: out.index_fill(-1, torch.tensor([newline]), float("-inf"))
    )
    return LoadedModel(model=model, tokenizer=tok, kind="causal-lm", source="tiny")


def test_conversations_are_rendered_by_the_template_and_follow_the_seed():
    loaded = _loaded()
    texts = self_chat_texts(loaded, 4, seed=0)
    assert 1 <= len(texts) <= 4
    for text in texts:
        assert text.startswith("<|im_start|>user\n") and text.endswith("<|im_end|>\n")
        question, answer = text.split("<|im_end|>\n<|im_start|>assistant\n")
        assert question.removeprefix("<|im_start|>user\n").strip()  # an empty turn is dropped
        assert answer.removesuffix("<|im_end|>\n").strip()
    assert self_chat_texts(loaded, 4, seed=0) == texts  # the seed alone decides them
    assert self_chat_texts(loaded, 4, seed=1) != texts
    assert self_chat_texts(loaded, 0) == []
    assert loaded.model.training is False


def test_a_model_without_a_chat_template_is_refused():
    with pytest.raises(SelfChatError, match="no chat template"):
        self_chat_texts(_loaded(template=None), 2)


def _options(**kw) -> ExportOptions:
    return ExportOptions(model="tiny", out="unused", **kw)


def test_calibration_texts_give_the_share_to_conversations_spread_over_any_prefix():
    train = [f"article {i}" for i in range(40)]
    plain = calibration_texts(_options(calib_texts=8), train, [])
    assert len(plain) == 8 and len(set(plain)) == 8 and set(plain) <= set(train)
    chat = [f"chat {i}" for i in range(10)]
    mixed = calibration_texts(_options(calib_texts=8, chat_share=0.25), train, chat)
    assert [t for t in mixed if t.startswith("chat")] == ["chat 0", "chat 1"]
    assert mixed[0] == "chat 0" and mixed[4] == "chat 1"  # evenly, not bunched at one end
    assert [t for t in mixed if t.startswith("article")] == [plain[i] for i in (1, 2, 3, 5, 6, 7)]
    # fewer conversations than the share asks for: all of them, no repeats
    assert (
        sum(
            t.startswith("chat")
            for t in calibration_texts(_options(calib_texts=8, chat_share=0.5), train, chat[:1])
        )
        == 1
    )


def test_extra_rows_make_the_asked_share_of_training():
    base = Batches({"input_ids": torch.zeros(30, 8, dtype=torch.long)}, batch_size=4)
    base.tensors["labels"] = base.tensors["input_ids"]
    extra = torch.ones(4, 8, dtype=torch.long)
    mixed = with_extra_rows(base, extra, 0.25)
    assert mixed.n == 40 and int(mixed.tensors["input_ids"][:, 0].sum()) == 10
    assert torch.equal(mixed.tensors["input_ids"], mixed.tensors["labels"])
    assert mixed.batch_size == 4


@pytest.mark.parametrize("share", [0.0, 1.0, -0.1])
def test_chat_share_outside_the_open_interval_is_refused(share):
    with pytest.raises(ExportError, match="chat-share"):
        _options(chat_texts=4, chat_share=share).check()
    with pytest.raises(ExportError, match="chat-texts"):
        _options(chat_texts=-1).check()


def test_the_option_off_leaves_the_work_dir_key_as_it_was():
    off = _options().training_key()
    assert "chat_texts" not in off and "chat_share" not in off
    assert _options(chat_share=0.5).training_key() == off
    on = _options(chat_texts=8).training_key()
    assert on["chat_texts"] == 8 and on["chat_share"] == 0.25


@pytest.fixture(scope="module")
def chat_inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("chat")
    tok = tiny_tokenizer()
    tok.chat_template = CHATML
    torch.manual_seed(0)
    tiny_llama().save_pretrained(root / "chatty")
    tok.save_pretrained(root / "chatty")
    tiny_llama().save_pretrained(root / "base")
    tiny_tokenizer().save_pretrained(root / "base")
    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "ran", "to", "red", "house"]
    with (root / "text.jsonl").open("w") as f:
        for _ in range(48):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(24))}) + "\n")
    return {"chatty": root / "chatty", "base": root / "base", "data": root / "text.jsonl"}


def _export_opts(model: Path, data: Path, tmp_path: Path, **kw) -> ExportOptions:
    """test_pipeline's small run, with a few conversations in half the training rows."""
    from tests.test_pipeline import _opts

    values = dict(steps=2, steps_per_epoch=0, chat_texts=3, chat_share=0.5)
    return _opts({"model": model, "data": data}, tmp_path, **(values | kw))


def test_export_writes_the_conversations_once_and_reuses_them(chat_inputs, tmp_path, monkeypatch):
    from coalora.export import self_chat
    from coalora.export.pipeline import run_export

    # the saved random model answers only newlines (see _loaded): written conversations
    # stand in for it, and count the calls
    calls = []
    chat = [
        f"<|im_start|>user\nq{i}<|im_end|>\n<|im_start|>assistant\na{i}<|im_end|>\n"
        for i in range(3)
    ]

    def writes(loaded, n, seed=0):
        calls.append((n, seed))
        return chat[:n]

    monkeypatch.setattr(self_chat, "self_chat_texts", writes)
    opts = _export_opts(chat_inputs["chatty"], chat_inputs["data"], tmp_path)
    res = run_export(opts)
    assert calls == [(3, 0)] and "self chat" in res.phases
    assert json.loads((res.work_dir / "self_chat.json").read_text()) == chat
    log = (res.work_dir / "export.log").read_text()
    assert "of them from 3 conversations" in log
    opts.overwrite = True
    again = run_export(opts)
    assert calls == [(3, 0)]  # read back, not written again
    assert "reusing 3 self-written conversations" in (again.work_dir / "export.log").read_text()
    assert again.reused["train"]


def test_export_refuses_conversations_without_a_chat_template(chat_inputs, tmp_path):
    from coalora.export.pipeline import run_export

    opts = _export_opts(chat_inputs["base"], chat_inputs["data"], tmp_path)
    with pytest.raises(ExportError, match="needs a chat template"):
        run_export(opts)
    assert not (tmp_path / "bundle").exists() and not (tmp_path / "work").exists()
