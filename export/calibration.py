"""Calibration statistics: what each quantized matrix's input looks like on real text.

The quantizer and the allocator weight a matrix's error per input column by E[x_k^2], the
second moment of that column's activation: ``E ||(W - Q(W)) x||^2`` is then approximated by
``sum_k E[x_k^2] ||W[:, k] - Q(W)[:, k]||^2`` (the diagonal of the input covariance). The
moments are collected with forward pre-hooks over a few batches of text, ignoring padding.
``output_gradient_moments`` gives the other side, E[(dL/dy_j)^2] of each output channel, which
weighs that channel's error in the allocator's cost table.

Calibration text is BBC News (2,225 articles, 5 topics), read by ``coalora.export.data``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from contextlib import closing
from typing import TYPE_CHECKING, Any

import numpy as np

from coalora.export.models import LoadedModel, quantizable_linears

if TYPE_CHECKING:
    import torch


class CalibrationError(ValueError):
    """Calibration that cannot run (no texts, bad sizes)."""


def bbc_news_texts() -> list[tuple[str, str]]:
    """All BBC News articles as (text, topic) pairs, in a fixed order (topic, then file name)."""
    from coalora.export.data import load_bbc_news

    ds = load_bbc_news("classify")
    assert ds.labels is not None and ds.label_names is not None
    return [(text, ds.label_names[label]) for text, label in zip(ds.texts, ds.labels, strict=True)]


def calibration_texts(n: int, seed: int = 0) -> list[str]:
    """``n`` BBC News articles drawn evenly over the topics, deterministic in ``seed``."""
    by_topic: dict[str, list[str]] = {}
    for text, topic in bbc_news_texts():
        by_topic.setdefault(topic, []).append(text)
    rng = random.Random(seed)
    for texts in by_topic.values():
        rng.shuffle(texts)
    # Round-robin over topics so every topic is represented even for small n.
    picked: list[str] = []
    topics = sorted(by_topic)
    i = 0
    while len(picked) < n and any(by_topic.values()):
        texts = by_topic[topics[i % len(topics)]]
        if texts:
            picked.append(texts.pop())
        i += 1
    return picked


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    # The backbone alone: an LM head's logits (49k x hidden per token) are not needed here.
    base = getattr(model, "base_model", None)
    return base if base is not None else model


def _right_padded_batches(
    loaded: LoadedModel, texts: list[str], max_length: int, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """The model's inputs for ``texts``, ``batch_size`` at a time, on the model's device.
    Right padding keeps a causal LM's real tokens at their true positions; the tokenizer's own
    padding side is restored when the iterator is closed (use it under ``closing``)."""
    tok = loaded.tokenizer
    side = getattr(tok, "padding_side", "right")
    tok.padding_side = "right"
    device = next(loaded.model.parameters()).device
    try:
        for start in range(0, len(texts), batch_size):
            enc = tok(
                texts[start : start + batch_size],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=max_length,
            )
            inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
            if loaded.kind == "encoder" and "token_type_ids" in enc:
                inputs["token_type_ids"] = enc["token_type_ids"]
            yield {k: v.to(device) for k, v in inputs.items()}
    finally:
        tok.padding_side = side


def run_inputs(
    loaded: LoadedModel,
    texts: list[str],
    on_input: Callable[[str, torch.Tensor], None],
    max_length: int = 256,
    batch_size: int = 4,
) -> dict[str, torch.nn.Linear]:
    """Run ``texts`` through the model, calling ``on_input(name, x)`` with every quantizable
    linear's input ``x`` [tokens, in_features] (padding tokens removed), in call order; linears
    that read the same tensor back to back get the same ``x`` object."""
    import torch

    if not texts:
        raise CalibrationError("calibration needs at least one text")
    if max_length < 1 or batch_size < 1:
        raise CalibrationError("max_length and batch_size must be positive")
    linears = quantizable_linears(loaded.model)
    token_mask: dict[str, torch.Tensor] = {}
    # Linears called one after another on one tensor (q/k/v, gate/up) get one ``x`` object.
    prev: list[Any] = [None, None]

    def hook_for(name: str):
        def hook(_module, args):
            raw = args[0]
            if raw is prev[0]:
                on_input(name, prev[1])
                return
            x = raw.detach()
            x = x.reshape(-1, x.shape[-1])
            keep = token_mask.get("mask")
            if keep is not None and keep.numel() == x.shape[0]:
                x = x[keep]
            prev[0], prev[1] = raw, x
            on_input(name, x)

        return hook

    handles = [lin.register_forward_pre_hook(hook_for(n)) for n, lin in linears.items()]
    base = _base_model(loaded.model)
    try:
        batches = _right_padded_batches(loaded, texts, max_length, batch_size)
        with torch.no_grad(), closing(batches):
            for inputs in batches:
                token_mask["mask"] = inputs["attention_mask"].reshape(-1).bool()
                base(**inputs)
    finally:
        for h in handles:
            h.remove()
        prev[0] = prev[1] = None
    return linears


def activation_second_moments(
    loaded: LoadedModel, texts: list[str], max_length: int = 256, batch_size: int = 4
) -> dict[str, np.ndarray]:
    """E[x_k^2] of every quantizable linear's input column k over the (non-padding) tokens.

    Returns name -> float64 array of length in_features.
    """
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}

    def on_input(name: str, x: torch.Tensor) -> None:
        s = x.double().pow(2).sum(0)
        sums[name] = s if name not in sums else sums[name] + s
        counts[name] = counts.get(name, 0) + x.shape[0]

    linears = run_inputs(loaded, texts, on_input, max_length, batch_size)
    return {
        name: (sums[name] / max(counts[name], 1)).cpu().numpy()
        if name in sums
        else np.zeros(lin.in_features)
        for name, lin in linears.items()
    }


def output_gradient_moments(
    loaded: LoadedModel, texts: list[str], max_length: int = 256, batch_size: int = 2
) -> dict[str, np.ndarray] | None:
    """E[(dL/dy_j)^2] of every quantizable linear's output channel j over the (non-padding)
    tokens, L the summed next-token cross-entropy of the model as loaded: how much an error in
    that output moves the loss (the diagonal Fisher of the outputs).

    The cost table weighs a matrix's per-row output error by it, so the allocator spends bits
    where the loss feels them, not where the output error is merely large. ``None`` for an
    encoder: its task head is not trained yet, so there is no loss to differentiate.
    """
    import torch

    if loaded.kind != "causal-lm":
        return None
    if not texts:
        raise CalibrationError("calibration needs at least one text")
    linears = quantizable_linears(loaded.model)
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    keep: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def on_grad(g: torch.Tensor) -> None:
            g = g.detach().reshape(-1, g.shape[-1])[keep["mask"]].double()
            s = g.pow(2).sum(0)
            sums[name] = s if name not in sums else sums[name] + s
            counts[name] = counts.get(name, 0) + g.shape[0]

        def hook(_module, _args, out):
            if out.requires_grad:
                out.register_hook(on_grad)

        return hook

    def needs_grad(_module, _args, out):
        # Gradients reach every activation without computing any weight's.
        return out.requires_grad_()

    model = loaded.model
    handles = [lin.register_forward_hook(hook_for(n)) for n, lin in linears.items()]
    handles.append(model.get_input_embeddings().register_forward_hook(needs_grad))
    # No weight gets a gradient (a third of the backward pass, and the model's size in memory).
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    try:
        batches = _right_padded_batches(loaded, texts, max_length, batch_size)
        with torch.enable_grad(), closing(batches):
            for inputs in batches:
                ids, mask = inputs["input_ids"], inputs["attention_mask"]
                keep["mask"] = mask.reshape(-1).bool()
                logits = model(input_ids=ids, attention_mask=mask).logits
                labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
                loss = torch.nn.functional.cross_entropy(
                    logits[:, :-1].flatten(0, 1).float(), labels.flatten(), reduction="sum"
                )
                loss.backward()
    finally:
        for h in handles:
            h.remove()
        for p in trainable:
            p.requires_grad_(True)
    return {
        name: (sums[name] / max(counts[name], 1)).cpu().numpy()
        if name in sums
        else np.zeros(lin.out_features)
        for name, lin in linears.items()
    }
