"""Baselines in the export job's harness: same data, split, calibration, quantized weights,
training configuration set and held-out batches as ``run_export``; only the adapter differs.

Methods (quality at the optimal allocation of every budget):

- ``coa-lora``        the method: shared LoRA + θ, Pareto search between epochs (as ``run_export``)
- ``shared-lora``     one LoRA for every configuration (``use_theta=False``), trained over the
                      same starting configuration set
- ``per-config-lora`` one LoRA fine-tuned per evaluated configuration (its own single-config
                      training set): fine-tuning time grows with the number of configurations
- ``no-lora``         the quantized model alone (a classifier still trains its task head, or
                      its accuracy would be chance)
- ``fp``              full-precision base + LoRA: the upper bound, the same value at every budget

``run_baselines`` returns the curves and the fine-tuning seconds of each method.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from coalora.export.inputs import load_data, load_for_training
from coalora.export.options import ExportError, ExportOptions
from coalora.export.phases import (
    TrainingSets,
    cached_calibration,
    cached_cost_table,
    cached_row_weights,
    cached_self_chat,
    calibration_texts,
    held_out_batches,
    input_hessians,
    torch_threads,
    with_self_chat,
)
from coalora.export.workdir import CALIBRATION_FILE, COSTS_FILE, GRADIENTS_FILE, work_dir_for
from coalora.kernels import Configuration

log = logging.getLogger("coalora.export.baselines")

METHODS: tuple[str, ...] = ("coa-lora", "shared-lora", "per-config-lora", "no-lora", "fp")


@dataclass
class BaselineResults:
    """``curves[method]``: (bits, metric) per budget, in ``budgets`` order."""

    budgets: list[float]
    bits: list[float]  # of the allocation evaluated at each budget
    curves: dict[str, list[tuple[float, float]]]
    train_seconds: dict[str, float]  # total fine-tuning time per method
    metric_name: str
    higher_is_better: bool
    notes: list[str] = field(default_factory=list)
    # CoA-LoRA on configurations it trained on vs never saw: did a training step draw each
    # budget's allocation, and the metric of every starting allocation (bits, metric) in range.
    coa_budget_seen: list[bool] = field(default_factory=list)
    coa_seen_allocations: list[tuple[float, float]] = field(default_factory=list)
    # (bits, metric) of every configuration in CoA-LoRA's last training set, measured on the
    # held-out batches (``measure_final_set``): what its search found, for a hypervolume
    coa_final_set: list[tuple[float, float]] = field(default_factory=list)
    # what each of CoA-LoRA's search epochs did and cost (``SearchEpochLog``): the part of its
    # fine-tuning seconds that the other methods do not spend
    coa_search_epochs: list[dict[str, Any]] = field(default_factory=list)
    eval_examples: int = 0
    # quantizing and dequantizing every (matrix, option) once, before any method's clock: the
    # harness's, as calibration and the cost table are
    prepare_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "budgets": self.budgets,
            "bits": self.bits,
            "metric_name": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "curves": {m: [list(p) for p in pts] for m, pts in self.curves.items()},
            "train_seconds": self.train_seconds,
            "notes": self.notes,
            "coa_budget_seen": self.coa_budget_seen,
            "coa_seen_allocations": [list(p) for p in self.coa_seen_allocations],
            "coa_final_set": [list(p) for p in self.coa_final_set],
            "coa_search_epochs": self.coa_search_epochs,
            "eval_examples": self.eval_examples,
            "prepare_seconds": self.prepare_seconds,
        }


def _share_quantized(src: Any, dst: Any) -> None:
    # Both models quantize the same weights with the same importance and method: one cache
    # (a dict per layer) serves both, so the slow quantizer runs once per (matrix, option).
    for name, layer in src.layers.items():
        dst.layers[name]._cache = layer._cache


def run_baselines(
    opts: ExportOptions,
    budgets: Sequence[float],
    methods: Sequence[str] = METHODS,
    *,
    eval_batches: int | None = None,
    measure_final_set: bool = False,
) -> BaselineResults:
    """Train and evaluate each method at the optimal allocation of every budget.

    The search selects on the first ``opts.eval_batches`` held-out batches; the curves are
    measured on the next ``eval_batches`` (default: as many), which the search never saw.
    ``measure_final_set`` also measures every configuration of CoA-LoRA's last training set
    on those batches (``coa_final_set``).
    """
    from coalora.export.allocation import allocate
    from coalora.export.coa_lora import CoALoRAModel, evaluate, train
    from coalora.export.data import DataError
    from coalora.export.models import ModelLoadError
    from coalora.export.sweep import metric_direction
    from coalora.runtime.budget import BudgetError

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ExportError(f"unknown baseline {unknown[0]!r}: expected some of {', '.join(METHODS)}")
    if not budgets:
        raise ExportError("no budgets given")
    opts.check()
    try:
        inp = load_for_training(opts, load_data(opts))
    except (ModelLoadError, DataError) as exc:
        raise ExportError(str(exc)) from exc
    loaded, space = inp.loaded, inp.space
    if eval_batches is not None and eval_batches < 1:
        raise ExportError(f"eval-batches must be >= 1, got {eval_batches}")
    search_batches, held_out, _ = held_out_batches(inp.val_batches, opts.eval_batches, eval_batches)
    # Calibration and the cost table are the export job's: the same work directory serves both.
    work = work_dir_for(opts, inp)
    work.mkdir(parents=True, exist_ok=True)
    pristine = copy.deepcopy(loaded.model)  # the second adapter model wraps its own copy

    with torch_threads(opts.threads):
        chat = cached_self_chat(opts, loaded, work, opts.fresh)
        with_self_chat(opts, inp, chat)  # every method trains on the same mix
        texts = calibration_texts(opts, inp.split.train.texts, chat)
        moments, _ = cached_calibration(
            loaded, texts, opts.calib_len, work / CALIBRATION_FILE, opts.fresh
        )
        row_weights = cached_row_weights(opts, loaded, texts, work / GRADIENTS_FILE, opts.fresh)
        hessians = input_hessians(opts, loaded, texts)
        coa = CoALoRAModel(
            loaded.model,
            space,
            opts.adapter_config(),
            kind=loaded.kind,
            importance=moments,
            method=opts.quantizer,
            hessians=hessians,
        )
        costs, _ = cached_cost_table(
            coa, moments, work / COSTS_FILE, opts.fresh, opts.progress, row_weights=row_weights
        )
        # Every method trains on these weights: build them all before any method's clock.
        # Built lazily, the first method timed (CoA-LoRA) paid for quantizing every option
        # whenever the cost table came from the cache, and the others trained on its work.
        t_prepare = time.perf_counter()
        coa.prepare(progress=opts.progress)
        prepare_seconds = time.perf_counter() - t_prepare
        try:
            configs = [allocate(space, costs, float(b)) for b in budgets]
        except BudgetError as exc:
            raise ExportError(str(exc)) from exc
        bits = [space.bits(c) for c in configs]
        search = opts.pareto_search(space, search_batches, costs)
        initial = search.initial_set(opts.initial_budgets)

        shared = CoALoRAModel(
            pristine,
            space,
            opts.adapter_config(use_theta=False),
            kind=loaded.kind,
            importance=moments,
            method=opts.quantizer,
            hessians=hessians,
        )
        _share_quantized(coa, shared)
        init_state = {k: v.clone() for k, v in shared.trainable_state_dict().items()}

        def reset(mode: str) -> Any:
            shared.load_trainable_state_dict(init_state)
            shared.set_mode(mode)
            return shared

        history: list[dict[str, Any]] = []  # the last fit's step records

        def fit(model: Any, train_set: Sequence[Configuration], **kw: Any) -> float:
            t0 = time.perf_counter()
            res = train(
                model, inp.train_batches, train_set, steps=opts.steps, progress=opts.progress, **kw
            )
            history[:] = res.history
            return time.perf_counter() - t0

        # the configurations CoA-LoRA's steps drew, as the export records them
        coa_sets = TrainingSets(None, initial, space)

        def curve(model: Any) -> list[tuple[float, float]]:
            return [(b, evaluate(model, c, held_out)) for b, c in zip(bits, configs, strict=True)]

        curves: dict[str, list[tuple[float, float]]] = {}
        seconds: dict[str, float] = {}
        notes: list[str] = []
        coa_seen: list[bool] = []
        coa_alloc: list[tuple[float, float]] = []
        coa_final: list[tuple[float, float]] = []
        for method in methods:
            log.info("baseline %s ...", method)
            if method == "coa-lora":
                spe = opts.steps_per_epoch
                seconds[method] = fit(
                    coa,
                    initial,
                    steps_per_epoch=spe or None,
                    on_epoch_end=coa_sets.hook(search, spe) if spe else None,
                )
                curves[method] = curve(coa)
                uniform = coa.cfg.sampler == "uniform"
                seen = coa_sets.seen(
                    opts.steps, opts.configs_per_step, opts.seed, None if uniform else history
                )
                coa_seen = [c in seen for c in configs]
                # the seen allocations around the budgets: the curve unseen ones are held to
                lo, hi = min(bits) - 0.5, max(bits) + 0.5
                coa_alloc = [
                    (space.bits(c), evaluate(coa, c, held_out))
                    for c in initial
                    if lo <= space.bits(c) <= hi
                ]
                if measure_final_set:
                    coa_final = [
                        (space.bits(c), evaluate(coa, c, held_out)) for c in coa_sets.sets[-1][1]
                    ]
            elif method == "shared-lora":
                seconds[method] = fit(reset("quant"), initial)
                curves[method] = curve(shared)
            elif method == "per-config-lora":
                seconds[method], curves[method] = 0.0, []
                for b, c in zip(bits, configs, strict=True):
                    seconds[method] += fit(reset("quant"), [c])
                    curves[method].append((b, evaluate(shared, c, held_out)))
            elif method == "no-lora":
                model = reset("no-lora")
                if model.head_state_dict():  # a fresh task head must learn, or it is chance
                    seconds[method] = fit(model, initial)
                    notes.append("no-lora: the task head alone was trained (LoRA off)")
                else:
                    seconds[method] = 0.0
                curves[method] = curve(model)
            else:  # fp: the configuration is irrelevant, the base runs unquantized
                model = reset("fp")
                if model.cfg.starts_from_residual:  # unquantized, the residual is zero
                    for layer in model.layers.values():
                        layer.lora_B.data.zero_()
                seconds[method] = fit(model, initial[:1])
                value = evaluate(model, None, held_out)
                curves[method] = [(b, value) for b in bits]
            log.info("baseline %s: %.1f s of fine-tuning", method, seconds[method])
        shared.set_mode("quant")

    name, higher = metric_direction(loaded.kind)
    return BaselineResults(
        budgets=[float(b) for b in budgets],
        bits=bits,
        curves=curves,
        train_seconds=seconds,
        metric_name=name,
        higher_is_better=higher,
        notes=notes,
        coa_budget_seen=coa_seen,
        coa_seen_allocations=sorted(coa_alloc),
        coa_final_set=sorted(coa_final),
        coa_search_epochs=[e.to_dict() for e in search.history],
        eval_examples=sum(_batch_size(b) for b in held_out),
        prepare_seconds=prepare_seconds,
    )


def _batch_size(batch: dict[str, Any]) -> int:
    return int(batch["labels"].shape[0])
