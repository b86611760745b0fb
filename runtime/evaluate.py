"""``coalora eval``: quality of stored configurations measured on this device.

For each chosen configuration the runtime builds its session (θ pass, fold, MatMulNBits) and
measures, on held-out data:

- causal LMs: perplexity, teacher-forced: each block of ``seq_len`` tokens goes through the
  graph in one pass (logits at every position), the next-token NLL summed over positions
  1..n-1 of every block, ``exp(total / count)``, as the exporter's ``evaluate`` does;
- classifiers: accuracy over the examples (each truncated to ``seq_len`` tokens).

Which data: ``--data`` takes what ``coalora export train --data`` takes (runtime/data.py). When
it is the data the bundle was exported from (same texts and labels, after the export's
``--limit``), the held-out split the export recorded is used, and by default (``--blocks
stored``) exactly the blocks its Pareto figures were measured on, so the stored and the
device figures are comparable line by line; ``--blocks all`` takes every held-out block. Any
other data is evaluated whole (it is the user's held-out data).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coalora.runtime.budget import Budget, BudgetError
from coalora.runtime.data import (
    LEAD_PROBE,
    TextDataset,
    lm_block_ids,
    load_dataset,
    text_lead,
)
from coalora.runtime.engine import Runtime
from coalora.runtime.format.pareto import ParetoEntry, ParetoSet
from coalora.runtime.format.spec import Key, Training
from coalora.runtime.selection import Selection, SelectionError, select

DEFAULT_SEQ_LEN = 128


class EvalError(ValueError):
    """An evaluation that cannot run: bad --configs, data that does not fit the bundle."""


@dataclass
class HeldOut:
    """The examples (or LM blocks) measured, and where they came from."""

    description: str
    dataset: TextDataset
    seq_len: int
    first: int = 0  # first block (LM) or example (classify) measured
    count: int | None = None  # how many; None: all

    def to_dict(self) -> dict[str, Any]:
        return {
            "description": self.description,
            "source": self.dataset.source,
            "examples": len(self.dataset),
            "seq_len": self.seq_len,
            "first": self.first,
            "count": self.count,
        }


@dataclass
class ConfigResult:
    entry: ParetoEntry
    metric: float
    stored: float
    seconds: float
    measured_on: int  # tokens predicted (LM) or examples (classify)
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, metric_name: str) -> dict[str, Any]:
        e = self.entry
        return {
            "bits": e.bits,
            "options": dict(sorted(Counter(str(o) for o in e.config.values()).items())),
            "seen_in_training": e.seen_in_training,
            metric_name: self.metric,
            f"stored_{metric_name}": self.stored,
            "ratio_to_stored": self.metric / self.stored if self.stored else None,
            "measured_on": self.measured_on,
            "seconds": self.seconds,
        }


# -- which configurations --------------------------------------------------------------------
def choose_configs(rt: Runtime, spec: str) -> list[ParetoEntry]:
    """``all``: every stored configuration; ``2.5,4.5``: the one a device picks at each of
    those bits budgets (duplicates once), sorted by bits."""
    spec = spec.strip().lower()
    if spec == "all":
        return sorted(rt.pareto.entries, key=lambda e: e.bits)
    out: dict[Any, ParetoEntry] = {}
    for part in spec.split(","):
        item = part.strip().removesuffix("bits").strip()
        if not item:
            continue
        try:
            bits = float(item)
        except ValueError:
            raise EvalError(
                f"cannot read --configs {part.strip()!r}: expected 'all' or bits, e.g. 3,4.5"
            ) from None
        try:
            budget = Budget.bits(bits)
        except BudgetError as exc:
            raise EvalError(f"--configs {part.strip()!r}: {exc}") from None
        try:
            sel = rt.choose(budget)  # as the device would pick
        except SelectionError as exc:
            raise EvalError(str(exc)) from None
        out.setdefault(sel.config, sel.entry)
    if not out:
        raise EvalError("no configurations given: expected --configs all or e.g. 3,4.5")
    return sorted(out.values(), key=lambda e: e.bits)


# -- which data ------------------------------------------------------------------------------
def _digest(data: Any) -> str:
    # The exporter's fingerprint of its data (export/pipeline.py): sha256 of the sorted JSON.
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def held_out(rt: Runtime, data: str, *, seq_len: int | None, blocks: str) -> HeldOut:
    task = "classify" if rt.task == "classify" else "lm"
    ds = load_dataset(data, task)
    record = rt.bundle.manifest.get(Key.TRAINING) or {}
    options = record.get(Training.OPTIONS) or {}
    length = seq_len or int(options.get("seq_len") or DEFAULT_SEQ_LEN)
    limit_ctx = rt.context_length if task == "lm" else length
    length = min(length, limit_ctx)
    if length < 2:
        raise EvalError(f"--seq-len must be at least 2, got {length}")
    own = _bundle_split(ds, record)
    if own is None:
        return HeldOut(f"all of {ds.source} ({len(ds)} examples)", ds, length)
    val, n_search, n_measure = own
    bs = int(options.get("batch_size") or 1)
    desc = f"the bundle's held-out split of {ds.source} ({len(val)} examples)"
    if blocks == "stored" and n_measure:
        what = "blocks" if task == "lm" else "examples"
        first, count = n_search * bs, n_measure * bs
        desc += f", {what} {first}-{first + count - 1}: those its stored figures were measured on"
        return HeldOut(desc, val, length, first, count)
    return HeldOut(desc, val, length)


def _bundle_split(ds: TextDataset, record: dict[str, Any]) -> tuple[TextDataset, int, int] | None:
    """(held-out examples, batches the search used, batches the sweep measured) when ``ds``
    is the bundle's own data; None otherwise."""
    meta, split = record.get(Training.DATA), record.get(Training.SPLIT)
    options = record.get(Training.OPTIONS) or {}
    if not (isinstance(meta, dict) and isinstance(split, dict)):
        return None
    limit, seed = options.get("limit"), int(split.get("seed", 0))
    if isinstance(limit, int) and len(ds) > limit:
        keep = np.random.default_rng(seed).permutation(len(ds))[:limit]
        ds = ds.subset(sorted(int(i) for i in keep))
    if _digest({"texts": ds.texts, "labels": ds.labels}) != meta.get(Training.DATA_SHA256):
        return None
    indices = split.get("val_indices")
    if not isinstance(indices, list) or not indices or max(indices) >= len(ds):
        return None
    sweep = record.get(Training.SWEEP) or {}
    n_measure = int(sweep.get(Training.SWEEP_HELD_OUT_BATCHES) or 0)
    n_search = int(options.get("eval_batches") or 0) if sweep.get("disjoint_from_search") else 0
    return ds.subset([int(i) for i in indices]), n_search, n_measure


# -- measuring -------------------------------------------------------------------------------
def lm_blocks(rt: Runtime, texts: Sequence[str], seq_len: int) -> np.ndarray:
    """Documents joined with EOS between them, cut into [n, seq_len] ids, each led by what the
    tokenizer puts before a text (the exporter's ``lm_blocks``, with the bundle's tokenizer)."""
    tok = rt.tokenizer
    enc = tok.encode_batch(list(texts), add_special_tokens=False)
    lead = text_lead(
        tok.encode(LEAD_PROBE, add_special_tokens=True).ids,
        tok.encode(LEAD_PROBE, add_special_tokens=False).ids,
    )
    return lm_block_ids([e.ids for e in enc], rt.eos_token_ids[:1], lead, seq_len)


def _log_softmax_nll(logits: np.ndarray, targets: np.ndarray) -> float:
    z = logits.astype(np.float64)
    z -= z.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(z).sum(axis=-1))
    return float((logz - z[np.arange(len(targets)), targets]).sum())


def perplexity(rt: Runtime, blocks: np.ndarray, tick: Callable[[], None] = lambda: None) -> float:
    total, count = 0.0, 0
    for block in blocks:
        logits = rt.logits(block.tolist())
        total += _log_softmax_nll(logits[:-1], block[1:])
        count += len(block) - 1
        tick()
    return math.exp(total / count)


def accuracy(
    rt: Runtime, ds: TextDataset, seq_len: int, tick: Callable[[], None] = lambda: None
) -> float:
    assert ds.labels is not None and ds.label_names is not None
    known = set(rt.labels)
    missing = sorted(set(ds.label_names) - known)
    if missing:
        raise EvalError(
            f"{ds.source}: label {missing[0]!r} is not one of the bundle's labels {sorted(known)}"
        )
    correct = 0
    for text, label in zip(ds.texts, ds.labels, strict=True):
        correct += rt.classify(text, max_length=seq_len).label == ds.label_names[label]
        tick()
    return correct / len(ds)


def evaluate(
    rt: Runtime,
    entries: Sequence[ParetoEntry],
    data: HeldOut,
    *,
    progress: bool = True,
) -> list[ConfigResult]:
    """Build each configuration's session in turn and measure it on ``data``."""
    from rich.progress import Progress

    lm = rt.task != "classify"
    if lm:
        units: Any = lm_blocks(rt, data.dataset.texts, data.seq_len)
    else:
        units = data.dataset
    if data.count is not None:
        end = data.first + data.count
        if lm:
            units = units[data.first : end]
        else:
            units = units.subset(range(data.first, min(end, len(units))))
    if len(units) == 0:
        raise EvalError(f"{data.description}: nothing left to measure")
    results = []
    with Progress(disable=not progress, transient=True) as bar:
        job = bar.add_task("evaluating", total=len(entries) * len(units))
        for e in entries:
            bar.update(job, description=f"{e.bits:.2f} bits")
            t0 = time.perf_counter()
            rt.use(_selection_of(rt, e))

            def tick() -> None:
                bar.advance(job)

            if lm:
                value = perplexity(rt, units, tick)
                measured = int(units.shape[0] * (units.shape[1] - 1))
            else:
                value = accuracy(rt, units, data.seq_len, tick)
                measured = len(units)
            results.append(ConfigResult(e, value, e.metric, time.perf_counter() - t0, measured))
    return results


def _selection_of(rt: Runtime, entry: ParetoEntry) -> Selection:
    """The selection of exactly ``entry`` (with its memory plan)."""
    one = ParetoSet((entry,), rt.pareto.metric_name, rt.pareto.higher_is_better)
    return select(one, Budget.bits(entry.bits), rt.plan)


def report(rt: Runtime, data: HeldOut, results: Sequence[ConfigResult]) -> dict[str, Any]:
    name = rt.pareto.metric_name
    return {
        "bundle": str(rt.bundle.root),
        "task": rt.task,
        "metric_name": name,
        "higher_is_better": rt.pareto.higher_is_better,
        "data": data.to_dict(),
        "context_length": rt.context_length,
        "threads": rt.threads,
        "configurations": [r.to_dict(name) for r in results],
    }


def print_report(out: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    name = out["metric_name"]
    table = Table(title=f"{name} on {out['data']['description']}", title_justify="left")
    for col in ("bits", "options", "seen", f"{name} (device)", f"{name} (stored)", "ratio", "s"):
        table.add_column(col, justify="left" if col == "options" else "right")
    for r in out["configurations"]:
        table.add_row(
            f"{r['bits']:.2f}",
            ", ".join(f"{k} x{v}" for k, v in r["options"].items()),
            "yes" if r["seen_in_training"] else "no",
            f"{r[name]:.4g}",
            f"{r['stored_' + name]:.4g}",
            f"{r['ratio_to_stored']:.3f}" if r["ratio_to_stored"] is not None else "-",
            f"{r['seconds']:.1f}",
        )
    Console(highlight=False).print(table)


def plot(out: dict[str, Any], path: str | Path) -> Path:
    """The metric against bits: the device's figures and the bundle's stored ones."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = out["metric_name"]
    rows = out["configurations"]
    bits = [r["bits"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(bits, [r["stored_" + name] for r in rows], "o--", label="stored (workstation)")
    ax.plot(bits, [r[name] for r in rows], "s-", label="this device (coalora eval)")
    ax.set_xlabel("bits per weight")
    ax.set_ylabel(name)
    if name == "perplexity":
        ax.set_yscale("log")
    ax.set_title(Path(out["bundle"]).name, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)  # nothing half-written on failure
    return path
