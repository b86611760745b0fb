"""The bundle's Pareto set (pareto.json): stored configurations with their cost and quality.

Each stored entry is a configuration with its cost (average bits per weight and bytes of the
quantized matrices, as ``ConfigSpace`` counts them) and its measured quality. Readers
recompute both costs and refuse an entry whose stored figures differ.

Where a configuration names the head's option (``"lm_head"``), its bytes count the head and
its bits do not, so entries that differ only in their head differ in bytes alone: the front
keeps each whose bytes buy quality (a smaller head for a tight memory budget).

JSON form::

    {"format_version": 1, "metric_name": "accuracy", "higher_is_better": true,
     "entries": [{"options": {"<matrix>": "4b32", ...}, "bits": 4.53, "nbytes": 1234,
                  "metric": 0.91, "seen_in_training": true}, ...]}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from coalora.kernels.config import ConfigError, ConfigSpace, Configuration
from coalora.runtime.format.spec import PARETO_FORMAT_VERSION as FORMAT_VERSION
from coalora.runtime.format.spec import Pareto as K

# Stored bits are a float written to JSON; allow its rounding, nothing more.
_BITS_TOLERANCE = 1e-6


class ParetoError(ValueError):
    """A stored Pareto set that is malformed or does not match its configuration space."""


@dataclass(frozen=True)
class ParetoEntry:
    config: Configuration
    bits: float  # average bits per weight over the quantized matrices but the head
    nbytes: int  # bytes of the quantized matrices (the head's where the config names it)
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
            K.BITS: self.bits,
            K.NBYTES: self.nbytes,
            K.METRIC: self.metric,
            K.SEEN_IN_TRAINING: self.seen_in_training,
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
        """``a`` costs no more bits and no more bytes, is no worse, and is strictly better in
        one of the three (bytes only differ from bits where entries name their head)."""
        sa, sb = self._score(a), self._score(b)
        no_worse = a.bits <= b.bits and a.nbytes <= b.nbytes and sa >= sb
        return no_worse and (a.bits < b.bits or a.nbytes < b.nbytes or sa > sb)

    def front(self) -> ParetoSet:
        """The non-dominated entries by (bits, bytes: lower is better, metric), sorted by
        bits, then bytes."""
        kept = [e for e in self.entries if not any(self.dominates(o, e) for o in self.entries)]
        kept.sort(key=lambda e: (e.bits, e.nbytes, -self._score(e)))
        return ParetoSet(tuple(kept), self.metric_name, self.higher_is_better)

    # -- JSON -----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            K.FORMAT_VERSION: FORMAT_VERSION,
            K.METRIC_NAME: self.metric_name,
            K.HIGHER_IS_BETTER: self.higher_is_better,
            K.ENTRIES: [e.to_dict() for e in self.entries],
        }

    @classmethod
    def from_dict(cls, data: Any, space: ConfigSpace) -> ParetoSet:
        """Read a stored set, checking every entry against ``space``; raises ``ParetoError``."""
        if not isinstance(data, dict):
            raise ParetoError("a Pareto set must be a JSON object")
        version = data.get(K.FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ParetoError(
                f"Pareto set format version {version!r} is not supported (expected "
                f"{FORMAT_VERSION})"
            )
        metric_name = data.get(K.METRIC_NAME)
        if not isinstance(metric_name, str) or not metric_name:
            raise ParetoError("a Pareto set needs a 'metric_name' string")
        higher = data.get(K.HIGHER_IS_BETTER)
        if not isinstance(higher, bool):
            raise ParetoError("a Pareto set needs 'higher_is_better': true or false")
        raw = data.get(K.ENTRIES)
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
    for key in (K.BITS, K.NBYTES, K.METRIC, K.SEEN_IN_TRAINING):
        if key not in item:
            raise ParetoError(f"{where} has no {key!r}")
    try:
        entry = ParetoEntry(
            config=config,
            bits=item[K.BITS],
            nbytes=item[K.NBYTES],
            metric=item[K.METRIC],
            seen_in_training=item[K.SEEN_IN_TRAINING],
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
