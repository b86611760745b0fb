"""Conversations the shipped model writes itself, mixed into a causal LM's fine-tune.

A fine-tune on task text alone (news articles) teaches a chat model to continue articles,
and at low bits the quantized model also forgets how to answer. Conversations sampled from
the teacher (the model as loaded, before our quantization) carry its own chat behaviour into
training and calibration without any outside data, as LLM-QAT's data-free distillation does
(a tied head already holds the codes the bundle ships, ``train_on_the_shipped_head``):

1. the teacher writes a user turn, sampled after the template's ``user`` header;
2. it answers that turn greedily, as ``coalora-run`` does.

No question is written by us, so nothing here is tuned to a prompt the demo asks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from coalora.runtime.chat import USER, ChatFormat

QUESTION_TOKENS = 48  # a user turn longer than this is cut there
ANSWER_TOKENS = 96
QUESTION_TEMPERATURE = 0.9
QUESTION_TOP_P = 0.95
GENERATE_BATCH = 16


class SelfChatError(ValueError):
    """The model cannot write conversations (no chat template, no end-of-turn token)."""


def _chat_format(tokenizer: Any) -> ChatFormat:
    """The template as the bundle stores it (``export/chat``), rendered once."""
    from coalora.export.chat import chat_format_from_tokenizer

    fmt = chat_format_from_tokenizer(tokenizer)
    if fmt is None:
        raise SelfChatError("the model has no chat template to write conversations in")
    return fmt


def _stop_ids(tokenizer: Any, after: str) -> list[int]:
    """Tokens that end a turn: first the one the template puts after a user message (the
    end of a turn), then EOS."""
    ids = tokenizer(after, add_special_tokens=False)["input_ids"]
    stops = [int(ids[0])] if ids else []
    eos = tokenizer.eos_token_id
    if eos is not None and int(eos) not in stops:
        stops.append(int(eos))
    if not stops:
        raise SelfChatError("the chat template has no token that ends a turn")
    return stops


def _cut(ids: Sequence[int], stops: Sequence[int]) -> list[int]:
    out: list[int] = []
    for t in ids:
        if t in stops:
            break
        out.append(int(t))
    return out


@torch.no_grad()
def _generate(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    max_new_tokens: int,
    stops: list[int],
    sample: bool,
    generator: torch.Generator,
) -> list[list[int]]:
    """New token ids per prompt, left-padded batches, cut at the first stop token."""
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    device = next(model.parameters()).device
    out: list[list[int]] = []
    try:
        for start in range(0, len(prompts), GENERATE_BATCH):
            chunk = prompts[start : start + GENERATE_BATCH]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False)
            ids = enc["input_ids"].to(device)
            mask = enc["attention_mask"].to(device)
            new = _decode(model, ids, mask, max_new_tokens, stops, pad, sample, generator)
            out.extend(_cut(row.tolist(), stops) for row in new)
    finally:
        tokenizer.padding_side = side
    return out


def _decode(
    model: Any,
    ids: torch.Tensor,
    mask: torch.Tensor,
    max_new_tokens: int,
    stops: list[int],
    pad: int,
    sample: bool,
    generator: torch.Generator,
) -> torch.Tensor:
    """A plain KV-cached decode loop: ``generate``'s sampling draws from the global RNG, this
    one from ``generator``, so a run's conversations depend on its seed alone."""
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1
    )
    cache, logits = out.cache, out.logits[:, -1]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    stop = torch.tensor(stops, device=ids.device)
    new: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        if sample:
            nxt = _top_p_sample(logits / QUESTION_TEMPERATURE, QUESTION_TOP_P, generator)
        else:
            nxt = logits.argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
        new.append(nxt)
        done |= torch.isin(nxt, stop)
        if bool(done.all()):
            break
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
        )
        cache, logits = out.cache, out.logits[:, -1]
    return torch.stack(new, dim=1) if new else ids[:, :0]


def _top_p_sample(logits: torch.Tensor, top_p: float, generator: torch.Generator) -> torch.Tensor:
    probs = torch.softmax(logits.float(), dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    keep = sorted_p.cumsum(-1) - sorted_p < top_p  # the smallest set reaching top_p
    sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
    pick = torch.multinomial(sorted_p.cpu(), 1, generator=generator).to(logits.device)
    return order.gather(-1, pick)[:, 0]


def self_chat_texts(loaded: Any, n: int, seed: int = 0) -> list[str]:
    """``n`` single-turn conversations (question and answer, rendered by the chat template),
    written by ``loaded``'s model. Turns that come out empty are dropped, so fewer may
    return."""
    if n <= 0:
        return []
    tok, model = loaded.tokenizer, loaded.model
    fmt = _chat_format(tok)
    before, _, after = fmt.prompt.partition(USER)  # the template around the user's message
    stops = _stop_ids(tok, after)
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        questions = _generate(model, tok, [before] * n, QUESTION_TOKENS, stops, True, generator)
        asked = [tok.decode(q, skip_special_tokens=True).strip() for q in questions]
        asked = [q for q in asked if q]
        prompts = [fmt.render(q) for q in asked]  # as coalora-run renders a prompt
        answers = _generate(model, tok, prompts, ANSWER_TOKENS, stops, False, generator)
    finally:
        model.train(was_training)
    texts = []
    for question, answer in zip(asked, answers, strict=True):
        said = tok.decode(answer, skip_special_tokens=True).strip()
        if said:  # rendered whole by the template: each turn ends as the template ends one
            turns = [{"role": "user", "content": question}, {"role": "assistant", "content": said}]
            texts.append(tok.apply_chat_template(turns, tokenize=False))
    return texts
