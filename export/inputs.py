"""The export job's inputs (steps 1-2): the data, validated and split with a fixed seed, then
the model, its configuration space and the batches. Every bad input fails here, before any
slow work."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from coalora.export.options import ExportError, ExportOptions
from coalora.export.workdir import digest, read_json
from coalora.kernels import ConfigSpace

log = logging.getLogger("coalora.export.pipeline")


@dataclass
class Inputs:
    """What steps 1-2 produce (``load_data`` then ``load_for_training``)."""

    task: str  # "causal-lm" or "classify"
    dataset: Any  # TextDataset, after --limit
    n_total: int  # examples before --limit
    split: Any  # data.Split
    fingerprint: str  # sha256 of the texts and labels used
    loaded: Any = None  # LoadedModel
    space: ConfigSpace | None = None
    train_batches: Any = None  # data.Batches
    val_batches: Any = None

    @property
    def key(self) -> dict[str, Any]:
        return {"task": self.task, "data_sha256": self.fingerprint}


def load_data(opts: ExportOptions) -> Inputs:
    """Validate the model name and the data, subsample (``limit``), split with a fixed seed."""
    from coalora.export.data import load_dataset, train_val_split

    task = resolve_task(opts.task, model_kind(opts.model))
    ds = load_dataset(opts.data, "classify" if task == "classify" else "lm")
    n_total = len(ds)
    if opts.limit is not None and len(ds) > opts.limit:
        keep = np.random.default_rng(opts.seed).permutation(len(ds))[: opts.limit]
        ds = ds.subset(sorted(int(i) for i in keep))
    if opts.distill_weight > 0 and task == "classify":
        raise ExportError("--distill-weight needs a causal LM (a classifier head has no teacher)")
    if opts.chat_texts and task == "classify":
        raise ExportError("--chat-texts needs a causal LM (a classifier does not chat)")
    if opts.dtype != "float32" and task == "classify":
        # the task head trains in the base's dtype: AdamW in bf16 loses the updates
        raise ExportError(f"--dtype {opts.dtype} needs a causal LM (a classifier's head trains)")
    split = train_val_split(ds, opts.val_fraction, opts.seed)
    log.info(
        "data %s: %d examples (%d train, %d held out, seed %d)",
        ds.source,
        len(ds),
        len(split.train),
        len(split.val),
        opts.seed,
    )
    fingerprint = digest({"texts": ds.texts, "labels": ds.labels})
    return Inputs(task, ds, n_total, split, fingerprint)


def load_for_training(opts: ExportOptions, inp: Inputs) -> Inputs:
    """Load the model (with a fresh head for classification), its space and the batches."""
    from coalora.export.data import classification_batches, lm_batches
    from coalora.export.models import config_space, load_model

    ds, split = inp.dataset, inp.split
    classify = inp.task == "classify"
    loaded = load_model(
        opts.model,
        task="classify" if classify else None,
        num_labels=ds.num_labels if classify else None,
        allow_pickle=opts.allow_pickle,
        dtype=opts.dtype,
    )
    if classify and ds.label_names:  # the bundle names its classes
        loaded.model.config.id2label = dict(enumerate(ds.label_names))
        loaded.model.config.label2id = {n: i for i, n in enumerate(ds.label_names)}
    if not classify:
        from coalora.export.exporter import train_on_the_shipped_head

        train_on_the_shipped_head(loaded.model, opts.lm_head_option())
    if opts.chat_texts and not getattr(loaded.tokenizer, "chat_template", None):
        raise ExportError(
            f"--chat-texts needs a chat template, and {opts.model}'s tokenizer has none "
            "(a base model: leave --chat-texts at 0)"
        )
    inp.loaded = loaded
    inp.space = config_space(loaded.model, opts.quant_options())
    make = classification_batches if classify else lm_batches
    tok = loaded.tokenizer
    inp.train_batches = make(split.train, tok, opts.seq_len, opts.batch_size, opts.seed)
    try:
        inp.val_batches = make(split.val, tok, opts.seq_len, opts.batch_size, opts.seed)
    except ValueError as exc:
        raise ExportError(
            f"the held-out split is too small ({exc}): lower --seq-len or raise --val-fraction"
        ) from None
    return inp


def model_kind(model: str) -> str:
    """ "causal-lm" or "encoder" without loading weights (a missing model fails here, fast)."""
    from coalora.export import models
    from coalora.runtime.format.spec import ENCODER_TYPES

    path = models._resolve(model)
    if path.suffix == ".gguf":
        return "causal-lm"  # GGUF files are llama.cpp decoders
    config = read_json(path / "config.json") or {}
    return "encoder" if config.get("model_type") in ENCODER_TYPES else "causal-lm"


def resolve_task(task: str, kind: str) -> str:
    if task == "auto":
        return "classify" if kind == "encoder" else "causal-lm"
    if task == "causal-lm" and kind == "encoder":
        raise ExportError("an encoder (BERT-like) model cannot be trained as a causal LM")
    return task
