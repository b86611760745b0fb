"""Picking the configuration a device serves from the bundle's Pareto set.

- ``bits`` budget: the best-metric entry with ``bits <= budget`` (ties: fewer bytes)
- ``bytes`` budget: the best-metric entry whose whole memory plan (weights, LoRA, KV cache at
  the context length, runtime) fits
- ``auto``: as ``bytes``, with what ``probe.available_memory()`` reports

``cpu``, when given, names the CPU's class (``isa``): entries that use an option this CPU
runs through a dequantize-every-call path are skipped unless nothing else fits, and the
reason says which way it went.

``min_speed`` (``--min-speed``, the compute budget) keeps only entries whose predicted decode
speed on the device (``runtime/speed.py``) meets it.

``available_bytes``, when given, is a ceiling on the plan for every kind of budget (and
``address_space_bytes`` on the plan's virtual size): a device never picks a configuration it
cannot hold, whatever the flag says. When that ceiling, not the budget, decides, the
selection says so (``clamped_from``: what the budget alone would have picked). The stored set itself
(``ParetoSet``, pareto.json) is part of the bundle format: ``coalora.runtime.format.pareto``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from coalora.kernels.config import Configuration
from coalora.runtime.budget import Budget, format_bytes
from coalora.runtime.format.pareto import ParetoEntry, ParetoSet
from coalora.runtime.isa import CpuClass
from coalora.runtime.plan import MemoryPlan
from coalora.runtime.probe import available_memory

__all__ = ["Selection", "SelectionError", "select"]


class SelectionError(ValueError):
    """No stored configuration fits the budget; the message names the smallest that would."""


# -- selection ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Selection:
    entry: ParetoEntry
    plan: MemoryPlan
    reason: str  # one line, for the user
    budget: Budget
    limit_bytes: int | None  # the plan ceiling that applied, if any
    cpu: CpuClass | None = None  # the CPU class the choice was made for
    slow_fallback: bool = False  # every fitting entry uses an option slow on ``cpu``
    predicted_tok_s: float | None = None  # when chosen under a minimum speed
    # what an explicit budget alone would have picked, when the device's memory ruled it out
    clamped_from: ParetoEntry | None = None
    clamp_note: str = ""  # one line: what the device can give

    @property
    def config(self) -> Configuration:
        return self.entry.config


def select(
    pareto: ParetoSet,
    budget: Budget,
    plan_fn: Callable[[Configuration], MemoryPlan],
    available_bytes: int | None = None,
    cpu: CpuClass | None = None,
    accuracy_level: int = 4,
    address_space_bytes: int | None = None,
    min_speed: float | None = None,
    speed_fn: Callable[[Configuration], float] | None = None,
) -> Selection:
    """The best stored configuration within ``budget``; raises ``SelectionError`` if none fits.

    An ``auto`` budget without ``available_bytes`` is resolved here, once: what a
    whole-process plan may total on this device (``probe.MemoryProbe.plan_limit_bytes``, which
    counts what this process already holds, a running session included, as available).

    ``min_speed`` with ``speed_fn`` (a configuration's predicted decode tok/s): only entries
    predicted to decode at least that fast qualify, within the memory budget too.
    """
    if not pareto.entries:
        raise SelectionError("the Pareto set is empty: nothing to select")

    unit = "MB"
    limit: int | None = available_bytes
    if budget.kind == "auto":
        if limit is None:
            probe = available_memory()
            limit = probe.plan_limit_bytes
            if address_space_bytes is None:
                address_space_bytes = probe.rlimit_bytes
        within = f"auto budget ({format_bytes(limit)} available)"
    elif budget.kind == "bytes":
        assert isinstance(budget.value, int)
        unit = budget.unit
        if limit is not None and limit < budget.value:
            within = f"{budget} budget, clamped to {format_bytes(limit, unit)} available"
        else:
            limit = budget.value
            within = f"{budget} budget"
    else:
        within = f"{budget} budget"
    # What the device can give, named where it decided (a refusal, or entries it ruled out).
    device = ""
    if limit is not None and budget.kind == "bits":
        device += f" and {format_bytes(limit)} available"

    candidates: list[ParetoEntry] = list(pareto.entries)
    if budget.kind == "bits":
        assert isinstance(budget.value, float)
        candidates = [e for e in candidates if e.bits <= budget.value + 1e-9]
        if not candidates:
            need = min(e.bits for e in pareto.entries)
            raise SelectionError(
                f"no stored configuration fits {budget}: the smallest stored configuration "
                f"needs {_ceil(need, 2):.2f} bits"
            )

    plans: dict[Configuration, MemoryPlan] = {}

    def plan_of(entry: ParetoEntry) -> MemoryPlan:
        if entry.config not in plans:
            plans[entry.config] = plan_fn(entry.config)
        return plans[entry.config]

    va = address_space_bytes
    if va is not None:
        device += f" and {format_bytes(va, unit)} of address space (RLIMIT_AS)"
    # What the budget alone allows: a device limit below it is a clamp worth a warning.
    asked = candidates
    if budget.kind == "bytes":
        assert isinstance(budget.value, int)
        asked = [e for e in candidates if plan_of(e).total <= budget.value]

    def fits(e: ParetoEntry) -> bool:
        plan = plan_of(e)
        return (limit is None or plan.total <= limit) and (
            va is None or plan.address_space_bytes <= va
        )

    clamped_from: ParetoEntry | None = None
    clamp_note = ""
    if limit is not None or va is not None:
        fitting = [e for e in candidates if fits(e)]
        if not fitting:
            smallest = min(candidates, key=lambda e: plan_of(e).total)
            need = plan_of(smallest)
            needs = format_bytes(need.total, unit, round_up=True)
            if va is not None and need.address_space_bytes > va:
                needs += f" ({format_bytes(need.address_space_bytes, unit, round_up=True)} "
                needs += "of address space)"
            raise SelectionError(
                f"no stored configuration fits the {within}{device}: the smallest stored "
                f"configuration needs {needs}"
            )
        if budget.kind != "auto" and asked:
            wanted = _best(pareto, asked)
            if not fits(wanted):
                clamped_from = wanted
                need = plan_of(wanted)
                short = []  # what this device cannot give, in words
                if limit is not None and need.total > limit:
                    short.append(
                        f"plan {format_bytes(need.total, unit, round_up=True)}, "
                        f"{format_bytes(limit, unit)} available"
                    )
                if va is not None and need.address_space_bytes > va:
                    short.append(
                        f"{format_bytes(need.address_space_bytes, unit, round_up=True)} of "
                        f"address space, {format_bytes(va, unit)} left under RLIMIT_AS"
                    )
                clamp_note = (
                    f"the {budget} budget asks for {wanted.bits:.2f} bits, more than this "
                    f"device can give ({'; '.join(short)})"
                )
        if len(fitting) < len(candidates):
            within += device
        candidates = fitting

    speed_note, predicted = "", None
    if min_speed is not None and speed_fn is not None:
        speeds = {e.config: speed_fn(e.config) for e in candidates}
        fast_enough = [e for e in candidates if speeds[e.config] >= min_speed]
        if not fast_enough:
            best_speed = max(speeds.values())
            raise SelectionError(
                f"no stored configuration within the {within} is fast enough: --min-speed "
                f"needs at least {min_speed:g} tok/s; the fastest stored configuration is "
                f"predicted at {best_speed:.1f} tok/s"
            )
        candidates = fast_enough
        speed_note = f", predicted >= {min_speed:g} tok/s"

    cpu_note, fallback = "", False
    slow_bits = cpu.slow_bits(accuracy_level) if cpu is not None else frozenset()
    if slow_bits:
        assert cpu is not None
        fast = [e for e in candidates if not any(o.bits in slow_bits for o in e.config.values())]
        widths = "/".join(str(b) for b in sorted(slow_bits)) + "-bit matrices"
        if fast and len(fast) < len(candidates):
            cpu_note = (
                f"; skipped {len(candidates) - len(fast)} that use {widths}, slow on "
                f"{cpu.describe()}"
            )
        elif not fast:
            fallback = True
            cpu_note = (
                f"; every one of them uses {widths}, slow on {cpu.describe()}: nothing with "
                "fast options fits, so expect a slower decode"
            )
        candidates = fast or candidates

    best = _best(pareto, candidates)
    plan = plan_of(best)
    if speed_note:
        assert speed_fn is not None
        predicted = speed_fn(best.config)
        speed_note = f"{speed_note} (this one {predicted:.1f})"
    kind = "seen" if best.seen_in_training else "unseen"
    head = f" with a {best.config.head} LM head" if best.config.head is not None else ""
    reason = (
        f"{pareto.metric_name} {best.metric:.4g} at {best.bits:.2f} bits{head} "
        f"({kind} configuration, plan {format_bytes(plan.total, unit, round_up=True)}): "
        f"best of {len(candidates)}/{len(pareto.entries)} stored configurations within the {within}"
        f"{speed_note}{cpu_note}"
    )
    return Selection(
        entry=best,
        plan=plan,
        reason=reason,
        budget=budget,
        limit_bytes=limit,
        cpu=cpu,
        slow_fallback=fallback,
        predicted_tok_s=predicted,
        clamped_from=clamped_from,
        clamp_note=clamp_note,
    )


def _best(pareto: ParetoSet, entries: Iterable[ParetoEntry]) -> ParetoEntry:
    sign = 1.0 if pareto.higher_is_better else -1.0
    return min(entries, key=lambda e: (-sign * e.metric, e.nbytes, e.bits))


def _ceil(x: float, decimals: int) -> float:
    """Round up at ``decimals`` so a number quoted as "needs" really is enough."""
    scale = 10**decimals
    return math.ceil(x * scale - 1e-9) / scale
