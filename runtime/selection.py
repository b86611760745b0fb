"""The bundle's Pareto set and picking the configuration a device serves.

Each stored entry is a configuration with its cost (average bits per weight and bytes of the
quantized matrices, as ``ConfigSpace`` counts them) and its measured quality. Selection:

- ``bits`` budget: the best-metric entry with ``bits <= budget`` (ties: fewer bytes)
- ``bytes`` budget: the best-metric entry whose whole memory plan (weights, LoRA, KV cache at
  the context length, runtime) fits
- ``auto``: as ``bytes``, with what ``probe.available_memory()`` reports

``cpu``, when given, names the CPU's class (``isa``): entries that use an option this CPU
runs through a dequantize-every-call path are skipped unless nothing else fits, and the
reason says which way it went.

``available_bytes``, when given, is a ceiling on the plan for every kind of budget: a device
never picks a configuration it cannot hold, whatever the flag says.

JSON form::

    {"format_version": 1, "metric_name": "accuracy", "higher_is_better": true,
     "entries": [{"options": {"<matrix>": "4b32", ...}, "bits": 4.53, "nbytes": 1234,
                  "metric": 0.91, "seen_in_training": true}, ...]}
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from coalora.kernels.config import ConfigError, ConfigSpace, Configuration
from coalora.runtime.budget import Budget, format_bytes
from coalora.runtime.isa import CpuClass
from coalora.runtime.plan import MemoryPlan
from coalora.runtime.probe import available_memory

FORMAT_VERSION = 1
# Stored bits are a float written to JSON; allow its rounding, nothing more.
_BITS_TOLERANCE = 1e-6


class ParetoError(ValueError):
    """A stored Pareto set that is malformed or does not match its configuration space."""


class SelectionError(ValueError):
    """No stored configuration fits the budget; the message names the smallest that would."""


@dataclass(frozen=True)
class ParetoEntry:
    config: Configuration
    bits: float  # average bits per weight over the quantized matrices
    nbytes: int  # bytes of the quantized matrices
    metric: float
    seen_in_training: bool

    def __post_init__(self) -> None:
        if not isinstance(self.config, Configuration):
            raise ParetoError("a Pareto entry's config must be a Configuration")
        if not (_is_number(self.bits) and math.isfinite(self.bits) and self.bits > 0):
            raise ParetoError(f"a Pareto entry's bits must be a positive number, got {self.bits!r}")
        if not (isinstance(self.nbytes, int) and not isinstance(self.nbytes, bool)):
            raise ParetoError(f"a Pareto entry's nbytes must be an integer, got {self.nbytes!r}")
        if self.nbytes <= 0:
            raise ParetoError(f"a Pareto entry's nbytes must be positive, got {self.nbytes}")
        if not (_is_number(self.metric) and math.isfinite(self.metric)):
            raise ParetoError(f"a Pareto entry's metric must be finite, got {self.metric!r}")
        if not isinstance(self.seen_in_training, bool):
            raise ParetoError("a Pareto entry's seen_in_training must be true or false")

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.config.to_dict(),
            "bits": self.bits,
            "nbytes": self.nbytes,
            "metric": self.metric,
            "seen_in_training": self.seen_in_training,
        }


@dataclass(frozen=True)
class ParetoSet:
    entries: tuple[ParetoEntry, ...]
    metric_name: str
    higher_is_better: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "entries", tuple(self.entries))
        if not self.metric_name:
            raise ParetoError("a Pareto set needs a metric name")

    def __len__(self) -> int:
        return len(self.entries)

    def better(self, a: float, b: float) -> bool:
        """Whether metric ``a`` is strictly better than ``b``."""
        return a > b if self.higher_is_better else a < b

    def _score(self, entry: ParetoEntry) -> float:
        return entry.metric if self.higher_is_better else -entry.metric

    def dominates(self, a: ParetoEntry, b: ParetoEntry) -> bool:
        """``a`` costs no more bits, is no worse, and is strictly better in one of the two."""
        no_worse = a.bits <= b.bits and self._score(a) >= self._score(b)
        return no_worse and (a.bits < b.bits or self._score(a) > self._score(b))

    def front(self) -> ParetoSet:
        """The non-dominated entries by (bits: lower is better, metric), sorted by bits."""
        kept = [e for e in self.entries if not any(self.dominates(o, e) for o in self.entries)]
        kept.sort(key=lambda e: (e.bits, -self._score(e)))
        return ParetoSet(tuple(kept), self.metric_name, self.higher_is_better)

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "metric_name": self.metric_name,
            "higher_is_better": self.higher_is_better,
            "entries": [e.to_dict() for e in self.entries],
        }

    @classmethod
    def from_dict(cls, data: Any, space: ConfigSpace) -> ParetoSet:
        """Read a stored set, checking every entry against ``space``; raises ``ParetoError``."""
        if not isinstance(data, dict):
            raise ParetoError("a Pareto set must be a JSON object")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise ParetoError(
                f"Pareto set format version {version!r} is not supported (expected "
                f"{FORMAT_VERSION})"
            )
        metric_name = data.get("metric_name")
        if not isinstance(metric_name, str) or not metric_name:
            raise ParetoError("a Pareto set needs a 'metric_name' string")
        higher = data.get("higher_is_better")
        if not isinstance(higher, bool):
            raise ParetoError("a Pareto set needs 'higher_is_better': true or false")
        raw = data.get("entries")
        if not isinstance(raw, list) or not raw:
            raise ParetoError("a Pareto set needs a non-empty 'entries' list")
        entries = [_entry_from_dict(i, item, space) for i, item in enumerate(raw)]
        seen: set[Configuration] = set()
        for i, e in enumerate(entries):
            if e.config in seen:
                raise ParetoError(f"entry {i}: the same configuration is stored twice")
            seen.add(e.config)
        return cls(tuple(entries), metric_name, higher)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _entry_from_dict(index: int, item: Any, space: ConfigSpace) -> ParetoEntry:
    where = f"Pareto entry {index}"
    if not isinstance(item, dict):
        raise ParetoError(f"{where} must be an object")
    try:
        config = space.config_from_dict(item)
    except ConfigError as exc:
        raise ParetoError(f"{where}: {exc}") from None
    for key in ("bits", "nbytes", "metric", "seen_in_training"):
        if key not in item:
            raise ParetoError(f"{where} has no {key!r}")
    try:
        entry = ParetoEntry(
            config=config,
            bits=item["bits"],
            nbytes=item["nbytes"],
            metric=item["metric"],
            seen_in_training=item["seen_in_training"],
        )
    except ParetoError as exc:
        raise ParetoError(f"{where}: {exc}") from None
    # The stored costs must be the ones the device will pay, or selection would be wrong.
    nbytes = space.nbytes(config)
    if entry.nbytes != nbytes:
        raise ParetoError(
            f"{where}: stored nbytes {entry.nbytes} do not match its configuration ({nbytes})"
        )
    bits = space.bits(config)
    if abs(entry.bits - bits) > _BITS_TOLERANCE:
        raise ParetoError(
            f"{where}: stored bits {entry.bits} do not match its configuration ({bits:.6f})"
        )
    return entry


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
) -> Selection:
    """The best stored configuration within ``budget``; raises ``SelectionError`` if none fits."""
    if not pareto.entries:
        raise SelectionError("the Pareto set is empty: nothing to select")

    unit = "MB"
    limit: int | None = available_bytes
    if budget.kind == "auto":
        if limit is None:
            limit = available_memory().available_bytes
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
        if limit is not None:
            within += f" and {format_bytes(limit)} available"

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

    if limit is not None:
        fitting = [e for e in candidates if plan_of(e).total <= limit]
        if not fitting:
            need_bytes = min(plan_of(e).total for e in candidates)
            raise SelectionError(
                f"no stored configuration fits the {within}: the smallest stored configuration "
                f"needs {format_bytes(need_bytes, unit, round_up=True)}"
            )
        candidates = fitting

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
    kind = "seen" if best.seen_in_training else "unseen"
    reason = (
        f"{pareto.metric_name} {best.metric:.4g} at {best.bits:.2f} bits "
        f"({kind} configuration, plan {format_bytes(plan.total, unit, round_up=True)}): "
        f"best of {len(candidates)}/{len(pareto.entries)} stored configurations within the {within}"
        f"{cpu_note}"
    )
    return Selection(
        entry=best,
        plan=plan,
        reason=reason,
        budget=budget,
        limit_bytes=limit,
        cpu=cpu,
        slow_fallback=fallback,
    )


def _best(pareto: ParetoSet, entries: Iterable[ParetoEntry]) -> ParetoEntry:
    sign = 1.0 if pareto.higher_is_better else -1.0
    return min(entries, key=lambda e: (-sign * e.metric, e.nbytes, e.bits))


def _ceil(x: float, decimals: int) -> float:
    """Round up at ``decimals`` so a number quoted as "needs" really is enough."""
    scale = 10**decimals
    return math.ceil(x * scale - 1e-9) / scale
