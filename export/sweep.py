"""The deployable Pareto set: a dense sweep of configurations measured with the trained adapter.

After training, the configurations a device may pick are:

- the optimal allocation (``export.allocation.allocate``) at every budget from 2.5 to 8 bits
  in steps of 0.25, clipped to what the configuration space can reach;
- a few random configurations that training never drew, to measure (and ship) how θ does on
  configurations it has never seen.

Each is evaluated on held-out batches with the CURRENT adapter (U = θ(config)), giving a
``ParetoEntry(config, bits, nbytes, metric, seen_in_training)``; the bundle keeps the
non-dominated ones (``ParetoSet.front()``).

With head options (``--head-options``: a tied LM head as a configured matrix), every entry
of that set is measured again with the head at each other option (``with_head_options``), and
the set keeps the entries whose bytes buy quality: a configuration's bits do not count its
head, its bytes do, so a smaller head is what a tight memory budget picks.

With a ``device_class`` (``runtime.isa``, e.g. ``armv8.0`` for a Raspberry Pi 4), the sweep
also allocates within the options that class runs fast and the bundle keeps that second
front too: a device of that class then finds configurations it can serve at full speed
instead of falling back to ones with slow options.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm

from coalora.export import distributed
from coalora.export.allocation import CostTable, allocate
from coalora.export.coa_lora.model import CoALoRAModel
from coalora.export.coa_lora.train import Batch, evaluate, random_configurations
from coalora.kernels.config import ConfigSpace, Configuration
from coalora.kernels.options import QuantOption
from coalora.runtime.format.pareto import ParetoEntry, ParetoSet
from coalora.runtime.isa import CpuClass, check_device_class

SWEEP_LO = 2.5
SWEEP_HI = 8.0
SWEEP_STEP = 0.25


class SweepError(ValueError):
    """A sweep that cannot run (an empty or impossible budget range)."""


@dataclass(frozen=True)
class SweepPoint:
    """One evaluated configuration; ``source`` is "allocation@<budget>" or "random"."""

    entry: ParetoEntry
    source: str


def metric_direction(kind: str) -> tuple[str, bool]:
    """(metric name, higher is better) of ``evaluate(..., "auto")`` for a model kind."""
    return ("perplexity", False) if kind == "causal-lm" else ("accuracy", True)


def sweep_budgets(
    space: ConfigSpace,
    lo: float = SWEEP_LO,
    hi: float = SWEEP_HI,
    step: float = SWEEP_STEP,
) -> list[float]:
    """Budgets ``lo, lo+step, ..., hi`` clipped to [space.min_bits(), space.max_bits()].

    The space's own ends join the list when clipping cut the range, so the cheapest and the
    most precise reachable configurations are always offered.
    """
    if not all(math.isfinite(v) for v in (lo, hi, step)) or step <= 0:
        raise SweepError(f"sweep step must be a positive number, got {step}")
    if lo > hi:
        raise SweepError(f"sweep range is empty: low end {lo:g} is above high end {hi:g}")
    s_lo, s_hi = space.min_bits(), space.max_bits()
    if hi < s_lo or lo > s_hi:
        raise SweepError(
            f"sweep range {lo:g}-{hi:g} bits misses everything this model can reach "
            f"({s_lo:.3f}-{s_hi:.3f} bits per weight)"
        )
    n = int(math.floor((hi - lo) / step + 1e-9)) + 1
    grid = [round(lo + i * step, 6) for i in range(n)]
    budgets = [b for b in grid if s_lo <= b <= s_hi]
    if lo < s_lo:
        budgets.insert(0, s_lo)
    if hi > s_hi:
        budgets.append(s_hi)
    return sorted(set(budgets))


def sweep_configurations(
    space: ConfigSpace,
    costs: CostTable | np.ndarray,
    budgets: Sequence[float],
    *,
    n_random: int = 0,
    exclude_random: Iterable[Configuration] = (),
    seed: int = 0,
) -> list[tuple[Configuration, str]]:
    """Distinct (configuration, source): allocations at ``budgets``, then ``n_random`` random
    configurations not in ``exclude_random`` (nor among the allocations)."""
    out: dict[Configuration, str] = {}
    for b in budgets:
        out.setdefault(allocate(space, costs, float(b)), f"allocation@{b:g}")
    excluded = set(exclude_random) | set(out)
    if n_random > 0:
        # Draw extra so that excluded ones can be skipped and still leave n_random.
        pool = random_configurations(space, 4 * n_random + len(excluded), seed=seed)
        picked = [c for c in pool if c not in excluded][:n_random]
        for c in picked:
            out[c] = "random"
    return list(out.items())


def fast_space(space: ConfigSpace, device_class: str) -> ConfigSpace | None:
    """``space`` restricted to the options ``device_class`` runs fast (None: all are, or
    none is)."""
    cpu = CpuClass(check_device_class(device_class), "export")
    fast = [o for o in space.options if not cpu.is_slow(o)]
    if not fast or len(fast) == len(space.options):
        return None
    return ConfigSpace(space.matrices, fast)


def fast_sweep_configurations(
    space: ConfigSpace,
    costs: CostTable | np.ndarray,
    device_class: str,
    lo: float = SWEEP_LO,
    hi: float = SWEEP_HI,
    step: float = SWEEP_STEP,
) -> list[tuple[Configuration, str]]:
    """Allocations at the sweep's budgets within the options fast on ``device_class``."""
    sub = fast_space(space, device_class)
    if sub is None:
        return []
    if isinstance(costs, np.ndarray):  # columns in ``space.options`` order
        cols = [space.options.index(o) for o in sub.options]
        costs = costs[:, cols]
    try:
        budgets = sweep_budgets(sub, lo, hi, step)
    except SweepError:
        return []
    out: dict[Configuration, str] = {}
    for b in budgets:
        out.setdefault(allocate(sub, costs, float(b)), f"{device_class}-allocation@{b:g}")
    return list(out.items())


def deployable(points: Sequence[SweepPoint], kind: str, device_class: str | None) -> ParetoSet:
    """The front of every point, plus (with ``device_class``) the front of the points whose
    options are all fast on that class, sorted by bits."""
    full = pareto_set(points, kind).front()
    if not device_class:
        return full
    cpu = CpuClass(check_device_class(device_class), "export")
    fast = [p for p in points if not any(cpu.is_slow(o) for o in p.entry.config.values())]
    if not fast:
        return full
    have = {e.config for e in full.entries}
    extra = [e for e in pareto_set(fast, kind).front().entries if e.config not in have]
    merged = sorted((*full.entries, *extra), key=lambda e: (e.bits, e.nbytes))
    return ParetoSet(tuple(merged), full.metric_name, full.higher_is_better)


def evaluate_sweep(
    model: CoALoRAModel,
    candidates: Sequence[tuple[Configuration, str]],
    batches: Iterable[Batch],
    *,
    seen: Iterable[Configuration] = (),
    progress: bool = True,
) -> list[SweepPoint]:
    """Evaluate each candidate with the current adapter on ``batches`` (metric "auto"); under
    a process group every rank calls it and gets every point."""
    space = model.space
    seen_set = set(seen)
    held_out = list(batches)
    if not held_out:
        raise SweepError("the sweep needs held-out evaluation batches")
    # shared out over the ranks of a distributed run, every rank getting every metric
    bar = lambda mine: tqdm(  # noqa: E731
        mine, desc="sweep", disable=not (progress and distributed.is_main()), leave=False
    )
    metrics = distributed.shared_map(
        lambda cs: evaluate(model, cs[0], held_out, "auto"), candidates, progress=bar
    )
    points: list[SweepPoint] = []
    for (config, source), metric in zip(candidates, metrics, strict=True):
        entry = ParetoEntry(
            config=config,
            bits=space.bits(config),
            nbytes=space.nbytes(config),
            metric=float(metric),
            seen_in_training=config in seen_set,
        )
        points.append(SweepPoint(entry, source))
    return points


def with_head_options(
    model: CoALoRAModel,
    pareto: ParetoSet,
    options: Sequence[QuantOption],
    batches: Iterable[Batch],
    *,
    progress: bool = True,
) -> ParetoSet:
    """``pareto`` (measured with the default head, ``options[0]``) with every entry naming
    its head, plus each entry measured with each other head option where that is not
    dominated in (bits, bytes, metric)."""
    from coalora.export.exporter import head_space, serving_head

    space = head_space(model, options)
    held_out = list(batches)
    default, others = options[0], options[1:]

    def entry(e: ParetoEntry, head: QuantOption, metric: float) -> ParetoEntry:
        config = e.config.with_head(head)
        return ParetoEntry(config, e.bits, space.nbytes(config), metric, e.seen_in_training)

    kept = [entry(e, default, e.metric) for e in pareto.entries]
    measured: list[ParetoEntry] = []
    bar = tqdm(total=len(others) * len(kept), desc="heads", disable=not progress, leave=False)
    for head in others:
        with serving_head(model.base, head):
            for e in pareto.entries:
                measured.append(entry(e, head, float(evaluate(model, e.config, held_out, "auto"))))
                bar.update()
    bar.close()
    everything = ParetoSet((*kept, *measured), pareto.metric_name, pareto.higher_is_better)
    # the default head's entries stay as the sweep kept them (a device class's extra front
    # too); another head's only where nothing dominates it
    new = [m for m in measured if not any(everything.dominates(o, m) for o in everything.entries)]
    merged = sorted((*kept, *new), key=lambda e: (e.bits, e.nbytes))
    return ParetoSet(tuple(merged), pareto.metric_name, pareto.higher_is_better)


def pareto_set(points: Sequence[SweepPoint], kind: str) -> ParetoSet:
    """Every evaluated point as a ``ParetoSet`` (call ``.front()`` for the deployable one)."""
    name, higher = metric_direction(kind)
    return ParetoSet(tuple(p.entry for p in points), name, higher)


def dense_sweep(
    model: CoALoRAModel,
    costs: CostTable | np.ndarray,
    batches: Iterable[Batch],
    *,
    lo: float = SWEEP_LO,
    hi: float = SWEEP_HI,
    step: float = SWEEP_STEP,
    n_random: int = 8,
    seen: Iterable[Configuration] = (),
    seed: int = 0,
    progress: bool = True,
    device_class: str | None = None,
) -> tuple[ParetoSet, list[SweepPoint]]:
    """The deployable front and every evaluated point (allocations + unseen random ones, and
    with ``device_class`` the allocations within its fast options)."""
    seen = set(seen)
    budgets = sweep_budgets(model.space, lo, hi, step)
    candidates = sweep_configurations(
        model.space, costs, budgets, n_random=n_random, exclude_random=seen, seed=seed
    )
    if device_class:
        have = {c for c, _ in candidates}
        extra = fast_sweep_configurations(model.space, costs, device_class, lo, hi, step)
        candidates += [(c, src) for c, src in extra if c not in have]
    points = evaluate_sweep(model, candidates, batches, seen=seen, progress=progress)
    return deployable(points, model.kind, device_class), points
