"""Training batches over the datasets of ``coalora.runtime.data`` (re-exported here).

Batches are a function of the training step (``batches(step)``), so a resumed run sees the
same data.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch

from coalora.runtime.data import (  # noqa: F401  (re-exported: the exporter's data API)
    BBC_NAMES,
    LEAD_PROBE,
    TASKS,
    DataError,
    Split,
    Task,
    TextDataset,
    bbc_news_dir,
    lm_block_ids,
    load_bbc_news,
    load_dataset,
    load_jsonl,
    load_text_folder,
    text_lead,
    train_val_split,
)


# -- tokenisation and batches ----------------------------------------------------------------
def lm_blocks(texts: Sequence[str], tokenizer: Any, block_size: int) -> torch.Tensor:
    """Concatenate documents (EOS between them) and cut into [n_blocks, block_size] ids, each
    block led by what the tokenizer puts before a text (``runtime.data.lm_block_ids``)."""
    enc = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    lead = text_lead(
        tokenizer(LEAD_PROBE)["input_ids"],
        tokenizer(LEAD_PROBE, add_special_tokens=False)["input_ids"],
    )
    return torch.from_numpy(lm_block_ids(enc, sep, lead, block_size))


def classification_tensors(
    texts: Sequence[str], labels: Sequence[int], tokenizer: Any, max_length: int
) -> dict[str, torch.Tensor]:
    """Padded ``input_ids`` / ``attention_mask`` [n, max_length] and ``labels`` [n]."""
    enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding="max_length")
    return {
        "input_ids": torch.tensor(enc["input_ids"], dtype=torch.long),
        "attention_mask": torch.tensor(enc["attention_mask"], dtype=torch.long),
        "labels": torch.tensor(list(labels), dtype=torch.long),
    }


class Batches:
    """Batches over equally long tensors: ``batches(step)`` for training, iteration for eval.

    ``batches(step)`` shuffles once per epoch with ``(seed, epoch)``, so any step's batch is
    known without replaying earlier ones. Columns of pure padding are trimmed per batch.
    """

    def __init__(self, tensors: dict[str, torch.Tensor], batch_size: int, seed: int = 0):
        sizes = {int(t.shape[0]) for t in tensors.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise DataError("batch tensors must be non-empty and share their first dimension")
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}")
        self.tensors = tensors
        self.n = sizes.pop()
        self.batch_size = min(batch_size, self.n)
        self.seed = seed
        self.steps_per_epoch = self.n // self.batch_size
        self._perm: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        """Batches per sequential pass (the last may be short)."""
        return -(-self.n // self.batch_size)

    def _take(self, idx: np.ndarray | slice) -> dict[str, torch.Tensor]:
        batch = {k: v[idx] for k, v in self.tensors.items()}
        mask = batch.get("attention_mask")
        if mask is not None:
            width = int(mask.sum(1).max())
            for k, v in batch.items():
                if v.dim() == 2 and v.shape[1] == mask.shape[1]:
                    batch[k] = v[:, :width]
        return batch

    def __call__(self, step: int) -> dict[str, torch.Tensor]:
        epoch, i = divmod(step, self.steps_per_epoch)
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
        idx = self._perm[1][i * self.batch_size : (i + 1) * self.batch_size]
        return self._take(torch.from_numpy(idx))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        for start in range(0, self.n, self.batch_size):
            yield self._take(slice(start, start + self.batch_size))

    def head(self, n_batches: int) -> list[dict[str, torch.Tensor]]:
        """The first ``n_batches`` sequential batches (a fixed held-out sample)."""
        return [b for b, _ in zip(self, range(n_batches), strict=False)]


def lm_batches(
    ds: TextDataset, tokenizer: Any, block_size: int, batch_size: int, seed: int = 0
) -> Batches:
    """Causal LM batches: ``input_ids`` and ``labels`` (the model shifts them)."""
    blocks = lm_blocks(ds.texts, tokenizer, block_size)
    return Batches({"input_ids": blocks, "labels": blocks}, batch_size, seed)


def with_extra_rows(batches: Batches, extra: torch.Tensor, share: float) -> Batches:
    """``batches`` (causal LM) with the blocks ``extra`` added, repeated in turn until they make
    ``share`` of all rows: a few conversations weigh as much in training as asked."""
    n = max(1, round(share / (1.0 - share) * batches.n))
    rows = extra[torch.arange(n) % extra.shape[0]]
    tensors = {k: torch.cat([v, rows]) for k, v in batches.tensors.items()}
    return Batches(tensors, batches.batch_size, batches.seed)


def classification_batches(
    ds: TextDataset, tokenizer: Any, max_length: int, batch_size: int, seed: int = 0
) -> Batches:
    if ds.labels is None:
        raise DataError(f"{ds.source}: classification needs labels")
    return Batches(
        classification_tensors(ds.texts, ds.labels, tokenizer, max_length), batch_size, seed
    )
