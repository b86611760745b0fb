"""The export job's slow phases, each cached in the work directory (``workdir``): calibration,
the quantization cost table, the training configuration sets (with what training drew from
them) and the dense sweep. A phase reruns only when what it depends on changed, or ``fresh``.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from coalora.export.workdir import (
    SELF_CHAT_FILE,
    SWEEP_FILE,
    file_digest,
    read_json,
    write_json,
)
from coalora.kernels import ConfigSpace, Configuration

log = logging.getLogger("coalora.export.pipeline")


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _cached_arrays(path: Path, fresh: bool, what: str, compute: Callable[[], dict]):
    """Named arrays from ``path`` when a previous run wrote them, else ``compute()``'s, written
    whole (a temporary file renamed) so a failed run leaves nothing half-written."""
    from safetensors.numpy import load_file, save_file

    if path.is_file() and not fresh:
        log.info("reusing %s from %s", what, path)
        return {k: v for k, v in load_file(str(path)).items()}, True
    arrays = compute()
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(tmp))
    tmp.replace(path)
    return arrays, False


def cached_self_chat(opts: Any, loaded: Any, work: Path, fresh: bool) -> list[str]:
    """The conversations the shipped model writes (``export/self_chat``; ``opts.chat_texts``),
    from the work directory when a previous run wrote them. Empty when the option is off."""
    if opts.chat_texts <= 0:
        return []
    path = work / SELF_CHAT_FILE
    cached = None if fresh else read_json(path)
    if isinstance(cached, list) and all(isinstance(t, str) for t in cached):
        log.info("reusing %d self-written conversations from %s", len(cached), path)
        return cached
    from coalora.export.self_chat import self_chat_texts

    texts = self_chat_texts(loaded, opts.chat_texts, seed=opts.seed)
    log.info("the shipped model wrote %d conversations", len(texts))
    write_json(path, texts)
    return texts


def calibration_texts(opts: Any, train_texts: Sequence[str], chat: Sequence[str]) -> list[str]:
    """``opts.calib_texts`` training texts drawn with the seed, ``opts.chat_share`` of them
    replaced by the model's own conversations, spread evenly so that any prefix (the
    gradient pass reads the first ``ROW_WEIGHT_TEXTS``) keeps that share."""
    pick = np.random.default_rng(opts.seed).permutation(len(train_texts))[: opts.calib_texts]
    texts = [train_texts[int(i)] for i in pick]
    n_chat = min(len(chat), round(len(texts) * opts.chat_share)) if chat else 0
    for i in range(n_chat):
        texts[i * len(texts) // n_chat] = chat[i]
    return texts


def with_self_chat(opts: Any, inp: Any, chat: Sequence[str]) -> None:
    """Mix the conversations into ``inp``'s training batches (``opts.chat_share`` of rows)."""
    from coalora.export.data import lm_blocks, with_extra_rows

    if not chat:
        return
    before = inp.train_batches.n
    blocks = lm_blocks(chat, inp.loaded.tokenizer, opts.seq_len)
    inp.train_batches = with_extra_rows(inp.train_batches, blocks, opts.chat_share)
    log.info(
        "training on %d blocks, %d of them from %d conversations (%d blocks, repeated)",
        inp.train_batches.n,
        inp.train_batches.n - before,
        len(chat),
        blocks.shape[0],
    )


def cached_calibration(loaded: Any, texts: Sequence[str], max_length: int, path: Path, fresh: bool):
    """E[x_k^2] per matrix, from ``path`` when a previous run wrote it."""
    from coalora.export.calibration import activation_second_moments

    return _cached_arrays(
        path,
        fresh,
        "calibration",
        lambda: activation_second_moments(loaded, list(texts), max_length=max_length),
    )


# Texts the output gradients are averaged over: a per-channel mean over ~2k tokens at 128 a
# text (on SmolLM2, 16 texts took 6 s on 2 cores, a quiet machine).
ROW_WEIGHT_TEXTS = 16


def cached_row_weights(
    opts: Any, loaded: Any, texts: Sequence[str], path: Path, fresh: bool
) -> dict[str, np.ndarray] | None:
    """The cost table's per-output-channel weights: E[(dL/dy_j)^2] on the calibration texts
    when ``opts.cost_weights`` is "loss" and the model has a loss to differentiate, else None
    (every output channel counts alike)."""
    from coalora.export.calibration import output_gradient_moments

    # Checked here, not left to output_gradient_moments' None: no file for a model without a loss.
    if opts.cost_weights != "loss" or loaded.kind != "causal-lm":
        return None
    grads, _ = _cached_arrays(
        path,
        fresh,
        "output gradients",
        lambda: output_gradient_moments(
            loaded, list(texts)[:ROW_WEIGHT_TEXTS], max_length=opts.calib_len
        ),
    )
    return grads


def input_hessians(opts: Any, loaded: Any, texts: Sequence[str]) -> dict | None:
    """E[x x^T] of every matrix input on the calibration texts, when the quantizer needs them
    (not cached: a pass over the texts costs less than reading 400 MB for SmolLM2)."""
    from coalora.export.quantizers import needs_hessian
    from coalora.export.quantizers.hessians import activation_hessians

    if not needs_hessian(opts.quantizer):
        return None
    return activation_hessians(loaded, list(texts), max_length=opts.calib_len)


def cached_cost_table(
    model: Any,
    moments: dict[str, np.ndarray],
    path: Path,
    fresh: bool,
    progress: bool,
    layerwise: bool = False,
    write: bool = True,
    row_weights: dict[str, np.ndarray] | None = None,
):
    """Calibration-weighted error of every (matrix, option), read off the model's own quantized
    weights: the quantizer runs once per pair for both the costs and training. A layer with a
    Hessian (the gptq quantizer) gets the full tr((W-Q) H (W-Q)^T), else its diagonal.

    One pass over the layers quantizes for training and, unless reused, measures the costs;
    ``layerwise`` keeps only the codes of a layer once it is measured (``quantize_layers``).
    ``write``: whether this process writes the cache (rank 0 of a distributed run).
    ``row_weights`` (``cached_row_weights``) weigh each output channel's error."""
    from coalora.export.allocation import CostTable
    from coalora.export.quantizers import output_error

    space: ConfigSpace = model.space
    cached = None if fresh else read_json(path)
    names = [m.name for m in space.matrices]
    opts = [o.name for o in space.options]
    weighted = row_weights is not None
    if (
        cached
        and cached.get("matrices") == names
        and cached.get("options") == opts
        and cached.get("row_weighted", False) == weighted
    ):
        log.info("reusing cost table from %s", path)
        if layerwise:  # the codes are still needed; without it training quantizes lazily
            model.quantize_layers(layerwise=True, progress=progress)
        return CostTable(tuple(names), tuple(space.options), np.array(cached["costs"])), True
    costs = np.zeros((len(names), len(opts)))
    row = {n: i for i, n in enumerate(names)}
    col = {o: j for j, o in enumerate(space.options)}
    fp: dict[str, np.ndarray] = {}  # the current layer's fp32 weight, one at a time

    def measure(name: str, opt: Any, q: Any) -> None:
        layer = model.layers[name]
        if name not in fp:
            fp.clear()
            fp[name] = layer.weight.detach().float().cpu().numpy()
        imp = np.asarray(moments[name], dtype=np.float64)
        d = fp[name] - q.dequantize()
        w = None if row_weights is None else row_weights[name]
        costs[row[name], col[opt]] = output_error(
            d, importance=imp, hessian=layer.hessian, row_weights=w
        )

    model.quantize_layers(layerwise=layerwise, visit=measure, progress=progress)
    if write:
        table = {"matrices": names, "options": opts, "costs": costs.tolist()}
        write_json(path, table | {"row_weighted": weighted})
    return CostTable(tuple(names), tuple(space.options), costs), False


class TrainingSets:
    """The training configuration set in force from each step on, persisted (with a ``path``)
    so a resumed or reused run still knows exactly which configurations training drew
    (``seen``)."""

    def __init__(
        self,
        path: Path | None,
        initial: Sequence[Configuration],
        space: ConfigSpace,
        write: bool = True,
    ) -> None:
        self.path = path
        self.space = space
        self.write = write  # rank 0 of a distributed run writes; every rank reads
        stored = read_json(path) if path is not None else None
        if stored:
            self.sets = [
                (int(s["from_step"]), [space.config_from_dict(c) for c in s["configs"]])
                for s in stored
            ]
        else:
            self.sets = [(0, list(initial))]
            self._save()

    def _save(self) -> None:
        if self.path is None or not self.write:
            return
        write_json(
            self.path,
            [{"from_step": s, "configs": [c.to_dict() for c in cs]} for s, cs in self.sets],
        )

    def hook(self, search: Callable, steps_per_epoch: int) -> Callable:
        """``search`` as ``train``'s epoch hook, recording each set it returns."""

        def on_epoch_end(epoch: int, model: Any, current: list[Configuration]):
            new = list(search(epoch, model, current))
            start = (epoch + 1) * steps_per_epoch
            self.sets = [(s, cs) for s, cs in self.sets if s < start] + [(start, new)]
            self._save()
            return new

        return on_epoch_end

    def seen(
        self, steps: int, configs_per_step: int, seed: int, history: Sequence[dict] | None = None
    ) -> set[Configuration]:
        """Every configuration a training step drew: the trainer's uniform sampling replayed,
        or read off the training log's records (``history``: their ``drawn`` positions in the
        set in force), which a loss-driven sampler needs."""
        from coalora.export.coa_lora.train import sample_configs

        out: set[Configuration] = set()
        if history is not None:
            for rec in history:
                step = int(rec["step"]) - 1
                configs = [cs for start, cs in self.sets if start <= step][-1]
                out.update(configs[int(i)] for i in rec["drawn"])
            return out
        for i, (start, configs) in enumerate(self.sets):
            end = self.sets[i + 1][0] if i + 1 < len(self.sets) else steps
            for step in range(start, min(end, steps)):
                out.update(sample_configs(configs, configs_per_step, seed, step))
        return out


def held_out_batches(val: Any, n: int, measure: int | None = None) -> tuple[list, list, bool]:
    """(search batches, measuring batches, disjoint?): the first ``n`` held-out batches for the
    search, the next ``measure`` (default ``n``) to measure on, which the search did not select
    by; when the held-out split has no more than ``n`` batches both use the same ones."""
    held = val.head(n + (n if measure is None else measure))
    if len(held) > n:
        return held[:n], held[n:], True
    return held, held, False


def cached_sweep(
    model: Any,
    costs: Any,
    held_out: list,
    opts: Any,
    *,
    budgets: list[float],
    seen: set[Configuration],
    work: Path,
    adapter: Path,
    write: bool = True,
) -> tuple[Any, list[dict[str, Any]], bool]:
    """(the Pareto front, every evaluated point, reused?): the dense sweep measured on
    ``held_out`` with the trained adapter, from ``work`` when the same adapter, budgets and
    batches were swept before. ``write``: whether this process writes the cache."""
    from coalora.export.sweep import dense_sweep

    sweep_key = {
        "adapter": file_digest(adapter),
        "budgets": budgets,
        "random": opts.sweep_random,
        "seed": opts.seed,
        "batches": opts.eval_batches,
        "measured_on": len(held_out),
        **({"device_class": opts.device_class} if opts.device_class else {}),
    }
    cached = None if opts.fresh else read_json(work / SWEEP_FILE)
    if cached and cached.get("key") == sweep_key:
        log.info("reusing the sweep from %s", work / SWEEP_FILE)
        pareto, evaluated = _sweep_from_cache(cached, model.space, model.kind, opts.device_class)
        return pareto, evaluated, True
    front, points = dense_sweep(
        model,
        costs,
        held_out,
        lo=opts.sweep_lo,
        hi=opts.sweep_hi,
        step=opts.sweep_step,
        n_random=opts.sweep_random,
        seed=opts.seed,
        seen=seen,
        progress=opts.progress,
        device_class=opts.device_class,
    )
    evaluated = [{**p.entry.to_dict(), "source": p.source} for p in points]
    if write:
        write_json(work / SWEEP_FILE, {"key": sweep_key, "points": evaluated})
    return front, evaluated, False


def _sweep_from_cache(
    cached: dict, space: ConfigSpace, kind: str, device_class: str | None = None
) -> tuple[Any, list[dict]]:
    from coalora.export.sweep import SweepPoint, deployable
    from coalora.runtime.format.pareto import ParetoEntry

    points = []
    for p in cached["points"]:
        entry = ParetoEntry(
            config=space.config_from_dict(p),
            bits=float(p["bits"]),
            nbytes=int(p["nbytes"]),
            metric=float(p["metric"]),
            seen_in_training=bool(p["seen_in_training"]),
        )
        points.append(SweepPoint(entry, p.get("source", "")))
    return deployable(points, kind, device_class), list(cached["points"])


def train_log(train_dir: Path) -> list[dict]:
    """Every step's record from the training log (all of them, also when resumed)."""
    from coalora.export.coa_lora.train import LOG_FILE as TRAIN_LOG

    path = train_dir / TRAIN_LOG
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def final_loss(train_dir: Path, last: int = 5) -> float | None:
    """Mean training loss over the last steps, from the log (also when training was reused)."""
    from coalora.export.coa_lora.train import LOG_FILE as TRAIN_LOG

    path = train_dir / TRAIN_LOG
    if not path.is_file():
        return None
    losses = []
    for line in path.read_text(encoding="utf-8").splitlines()[-last:]:
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            losses.append(float(json.loads(line)["loss"]))
    return float(np.mean(losses)) if losses else None
