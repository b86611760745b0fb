"""Pareto-based search for CoA-LoRA's training configuration set.

Two objectives per configuration, both minimised:

- average bits per weight, known exactly (``space.bits``), no model needed;
- task loss (mean token NLL / cross-entropy) on held-out batches, measured with the CURRENT
  adapter (``evaluate_configs(..., metric="loss")``).

Between epochs (``ParetoSearch.__call__``, the ``train(..., on_epoch_end=)`` hook):

1. re-evaluate the current set with the current adapter (older losses belong to an older
   adapter and are not comparable);
2. fit a GP of loss over a low-dimensional feature vector of a configuration
   (``ConfigFeatures``);
3. generate a few hundred new valid configurations by discrete moves from the current set and
   from optimal allocations at many budgets (``CandidateGenerator``);
4. score them by log expected hypervolume improvement over (-bits, -loss), bits entering the
   acquisition as a deterministic function of the features, and pick ``q`` greedily (each pick
   joins the front at its predicted loss before the next is scored);
5. evaluate the picks, split the bit range into equal segments, keep each segment's
   non-dominated configurations and return their union as the next training set.

The reference point is always strictly worse than every observed point (max + 10% of range in
each objective); a reference point that dominates the observations makes every hypervolume
improvement zero and the acquisition meaningless.

Under a process group every rank runs the epoch: the evaluations (steps 1 and 5) are shared
out over the ranks (``evaluate_configs``), rank 0 alone fits the GP and picks (step 4, sent to
the others) and writes the log, so every rank returns the same next set.
"""

from __future__ import annotations

import json
import math
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from coalora.export import distributed
from coalora.export.allocation import CostTable, allocate
from coalora.export.coa_lora.model import CoALoRAModel
from coalora.export.coa_lora.train import (
    Batch,
    evaluate_configs,
    initial_configurations,
    random_configurations,
)
from coalora.kernels.config import ConfigSpace, Configuration
from coalora.runtime.format.theta import MODULE_TYPES, matrix_role

REF_MARGIN = 0.1


# -- Pareto helpers (minimisation) ------------------------------------------------------------
def non_dominated(points: np.ndarray | Sequence[Sequence[float]]) -> np.ndarray:
    """Boolean mask of the points no other point dominates (every objective minimised).

    ``a`` dominates ``b`` when ``a <= b`` everywhere and ``a < b`` somewhere; identical points
    do not dominate each other, so duplicates are all kept.
    """
    p = np.asarray(points, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"points must be [n, m], got shape {p.shape}")
    if len(p) == 0:
        return np.zeros(0, dtype=bool)
    le = (p[:, None, :] <= p[None, :, :]).all(-1)  # le[j, i]: p_j <= p_i everywhere
    lt = (p[:, None, :] < p[None, :, :]).any(-1)
    dominated = (le & lt).any(0)
    return ~dominated


def hypervolume_2d(points: np.ndarray | Sequence[Sequence[float]], ref: Sequence[float]) -> float:
    """Exact area dominated by ``points`` and bounded by ``ref`` (both objectives minimised).

    Points not strictly better than ``ref`` in both objectives add nothing.
    """
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    rx, ry = float(ref[0]), float(ref[1])
    p = p[(p[:, 0] < rx) & (p[:, 1] < ry)]
    if len(p) == 0:
        return 0.0
    p = p[np.lexsort((p[:, 1], p[:, 0]))]  # by x, then y
    area, best_y = 0.0, ry
    for x, y in p:
        if y < best_y:  # a new step of the staircase: [x, rx] x [y, best_y]
            area += (rx - x) * (best_y - y)
            best_y = y
    return float(area)


def reference_point(
    bits: Sequence[float],
    losses: Sequence[float],
    *,
    bits_range: tuple[float, float] | None = None,
    margin: float = REF_MARGIN,
) -> tuple[float, float]:
    """(bits, loss) strictly worse than every observed point: max + ``margin`` x range.

    ``bits_range`` (the space's min/max bits) widens the bits span so that candidates above the
    observed bits still fall inside the reference box.
    """
    out = []
    for values, extra in ((bits, bits_range), (losses, None)):
        v = np.asarray(values, dtype=np.float64)
        if v.size == 0 or not np.all(np.isfinite(v)):
            raise ValueError("reference point needs finite observations")
        lo, hi = float(v.min()), float(v.max())
        if extra is not None:
            lo, hi = min(lo, extra[0]), max(hi, extra[1])
        span = hi - lo
        if span <= 0:  # one distinct value: a margin relative to its size keeps it strict
            span = max(abs(hi), 1.0)
        out.append(hi + margin * span)
    return out[0], out[1]


def _segment_of(bits: np.ndarray, segments: int, lo: float, hi: float) -> np.ndarray:
    width = (hi - lo) / segments if hi > lo else 1.0
    return np.clip(np.floor((bits - lo) / width), 0, segments - 1).astype(np.int64)


def _spread(n: int, k: int) -> list[int]:
    """``k`` indices evenly spaced over ``range(n)`` (both ends first)."""
    if k >= n:
        return list(range(n))
    return sorted({int(round(x)) for x in np.linspace(0, n - 1, k)})


def segmented_front_indices(
    bits: Sequence[float],
    losses: Sequence[float],
    segments: int,
    *,
    lo: float | None = None,
    hi: float | None = None,
    max_size: int | None = None,
) -> list[int]:
    """Indices of each bit segment's non-dominated points, sorted by bits.

    The range [lo, hi] (default: the observed one) is split into ``segments`` equal widths.
    With ``max_size`` the union is thinned to that size while every occupied segment keeps at
    least one point: the budget is shared out evenly (segments with fewer points give their
    share back), and within a segment the kept points are spread along its front.
    """
    if segments < 1:
        raise ValueError(f"segments must be >= 1, got {segments}")
    b = np.asarray(bits, dtype=np.float64)
    y = np.asarray(losses, dtype=np.float64)
    if b.shape != y.shape or b.ndim != 1:
        raise ValueError("bits and losses must be 1-D and of equal length")
    if len(b) == 0:
        return []
    lo = float(b.min()) if lo is None else lo
    hi = float(b.max()) if hi is None else hi
    seg = _segment_of(b, segments, lo, hi)
    fronts: list[list[int]] = []
    for s in range(segments):
        idx = np.flatnonzero(seg == s)
        if len(idx) == 0:
            continue
        keep = idx[non_dominated(np.stack([b[idx], y[idx]], 1))]
        fronts.append(sorted(keep.tolist(), key=lambda i: (b[i], y[i])))
    if max_size is not None:
        if max_size < len(fronts):
            raise ValueError(
                f"max_size {max_size} is below the {len(fronts)} occupied segments to cover"
            )
        quota = [0] * len(fronts)
        left = max_size
        while left > 0:  # water-filling: one more per segment that still has points
            open_ = [i for i, f in enumerate(fronts) if quota[i] < len(f)]
            if not open_:
                break
            for i in open_[:left]:
                quota[i] += 1
            left = max_size - sum(quota)
        fronts = [[f[j] for j in _spread(len(f), q)] for f, q in zip(fronts, quota, strict=True)]
    out = [i for f in fronts for i in f]
    return sorted(out, key=lambda i: (b[i], y[i]))


def segmented_front(
    configs: Sequence[Configuration],
    bits: Sequence[float],
    losses: Sequence[float],
    segments: int,
    *,
    lo: float | None = None,
    hi: float | None = None,
    max_size: int | None = None,
) -> list[Configuration]:
    """The configurations of ``segmented_front_indices``, duplicates dropped, sorted by bits."""
    if not (len(configs) == len(bits) == len(losses)):
        raise ValueError("configs, bits and losses must have equal lengths")
    # A configuration seen twice keeps its best loss; duplicates would crowd a segment.
    best: dict[Configuration, int] = {}
    for i, c in enumerate(configs):
        if c not in best or losses[i] < losses[best[c]]:
            best[c] = i
    uniq = list(best.values())
    idx = segmented_front_indices(
        [bits[i] for i in uniq],
        [losses[i] for i in uniq],
        segments,
        lo=lo,
        hi=hi,
        max_size=max_size,
    )
    return [configs[uniq[j]] for j in idx]


# -- features ---------------------------------------------------------------------------------
class ConfigFeatures:
    """A configuration as a short vector in [0, 1]^d, the GP's input.

    A configuration has one option per matrix (hundreds); a GP over that many dimensions with a
    few dozen observations learns nothing. Loss depends mostly on how many bits go where, so:

    - ``bits``: overall average bits (exact; feature 0, so bits can be read back from X);
    - ``bits:<type>``: average bits of each module type (q, k, v, o, gate, up, down): attention
      and MLP projections differ widely in sensitivity;
    - ``bits:depth<k>``: average bits of each depth third: first and last blocks are known to
      be more sensitive than the middle;
    - ``frac2`` / ``frac8``: share of weights at 2 and 8 bits: the same average can be a few
      2-bit matrices (costly) or none;
    - ``block``: average log2 block size: at equal average bits, small blocks spend bits on
      scales that large blocks spend on codes;
    - ``cost`` (with a cost table): log of the calibration-weighted quantization error, a
      direct proxy of loss.

    Averages are parameter-weighted; each feature is scaled by its own attainable range. Groups
    with no matrix and features the options make constant are left out.
    """

    def __init__(self, space: ConfigSpace, costs: np.ndarray | None = None) -> None:
        self.space = space
        self.option_index = {o: j for j, o in enumerate(space.options)}
        params = np.array([m.n_params for m in space.matrices], dtype=np.float64)
        # bits per weight of every (matrix, option): exactly what space.bits averages
        self.bpw = np.array(
            [
                [o.bits_per_weight(m.out_features, m.in_features) for o in space.options]
                for m in space.matrices
            ]
        )
        roles = [matrix_role(m.name) for m in space.matrices]
        n_layers = max(layer for layer, _ in roles) + 1
        groups: list[tuple[str, np.ndarray]] = [("bits", np.ones(len(params), dtype=bool))]
        for t in MODULE_TYPES:
            groups.append((f"bits:{t}", np.array([r[1] == t for r in roles])))
        for k in range(3):
            groups.append((f"bits:depth{k}", np.array([3 * r[0] // n_layers == k for r in roles])))
        rows, names = [], []
        for name, mask in groups:
            if mask.any():
                rows.append(np.where(mask, params, 0.0) / params[mask].sum())
                names.append(name)
        self._weights = np.stack(rows)  # [groups, matrices], rows sum to 1
        self._lo = self._weights @ self.bpw.min(1)
        self._hi = self._weights @ self.bpw.max(1)
        self.min_bits, self.max_bits = float(self._lo[0]), float(self._hi[0])
        share = params / params.sum()
        opt_bits = np.array([o.bits for o in space.options])
        self._extra: list[tuple[str, np.ndarray, float, float]] = []  # name, per-option, lo, hi
        for b in (2, 8):
            if (opt_bits == b).any() and not (opt_bits == b).all():
                self._extra.append((f"frac{b}", (opt_bits == b).astype(np.float64), 0.0, 1.0))
        log_block = np.log2([o.block_size for o in space.options])
        if log_block.max() > log_block.min():
            self._extra.append(("block", log_block, float(log_block.min()), float(log_block.max())))
        self._share = share
        self.costs = None if costs is None else np.maximum(np.asarray(costs, np.float64), 0.0)
        if self.costs is not None:
            # A floor keeps log finite where an option is lossless.
            self._eps = 1e-9 * max(float(self.costs.sum(1).max()), 1e-300)
            self._cost_lo = math.log(self.costs.min(1).sum() + self._eps)
            self._cost_hi = math.log(self.costs.max(1).sum() + self._eps)
        self.names = names + [e[0] for e in self._extra]
        if self.costs is not None and self._cost_hi > self._cost_lo:
            self.names.append("cost")

    @property
    def dim(self) -> int:
        return len(self.names)

    def indices(self, config: Mapping[str, Any]) -> np.ndarray:
        """Option index per matrix, in space order."""
        return np.array([self.option_index[config[m.name]] for m in self.space.matrices])

    def from_indices(self, idx: np.ndarray) -> np.ndarray:
        """Features of ``idx`` [n, matrices] (option indices) -> [n, dim]."""
        idx = np.atleast_2d(idx)
        rows = np.arange(idx.shape[1])
        bpw = self.bpw[rows, idx]  # [n, matrices]
        span = np.where(self._hi > self._lo, self._hi - self._lo, 1.0)
        feats = [(bpw @ self._weights.T - self._lo) / span]
        for _, per_option, lo, hi in self._extra:
            feats.append(((per_option[idx] @ self._share - lo) / (hi - lo))[:, None])
        if "cost" in self.names:
            total = self.costs[rows, idx].sum(1) + self._eps
            feats.append(
                ((np.log(total) - self._cost_lo) / (self._cost_hi - self._cost_lo))[:, None]
            )
        return np.clip(np.concatenate(feats, 1), 0.0, 1.0)

    def __call__(self, configs: Sequence[Mapping[str, Any]]) -> np.ndarray:
        if not configs:
            return np.zeros((0, self.dim))
        return self.from_indices(np.stack([self.indices(c) for c in configs]))

    def bits_from_features(self, X: torch.Tensor) -> torch.Tensor:
        """Average bits from feature 0 (exact up to rounding), for the acquisition."""
        return self.min_bits + X[..., 0] * (self.max_bits - self.min_bits)


# -- candidates -------------------------------------------------------------------------------
class CandidateGenerator:
    """New configurations by discrete moves from base configurations (option-index arrays).

    Moves: set one module type to one option over a range of blocks; raise (lower) the k
    matrices where a bit buys the most (costs the least) loss, by the cost table when there is
    one, else at random; change the block size of a module type or a block at fixed bit-width;
    cross two bases over blocks or module types.
    """

    def __init__(self, features: ConfigFeatures, costs: np.ndarray | None = None) -> None:
        self.f = features
        space = features.space
        self.n = len(space.matrices)
        self.n_opt = len(space.options)
        roles = [matrix_role(m.name) for m in space.matrices]
        self.layer = np.array([r[0] for r in roles])
        self.module = np.array([r[1] for r in roles])
        self.module_types = sorted(set(self.module.tolist()))
        self.layers = sorted(set(self.layer.tolist()))
        self.costs = costs
        bpw, params = features.bpw, np.array([m.n_params for m in space.matrices], np.float64)
        self.matrix_bits = bpw * params[:, None]  # [matrices, options]: total bits
        # next option up / down in bits per matrix (-1: none); ties go to the lower index
        self.up = np.full((self.n, self.n_opt), -1)
        self.down = np.full((self.n, self.n_opt), -1)
        for i in range(self.n):
            for o in range(self.n_opt):
                higher = np.flatnonzero(bpw[i] > bpw[i, o])
                lower = np.flatnonzero(bpw[i] < bpw[i, o])
                if len(higher):
                    self.up[i, o] = higher[np.argmin(bpw[i, higher])]
                if len(lower):
                    self.down[i, o] = lower[np.argmax(bpw[i, lower])]
        opts = space.options
        self.same_bits = [
            [j for j, p in enumerate(opts) if p.bits == o.bits and j != k]
            for k, o in enumerate(opts)
        ]

    # each move returns a new index array (or the input unchanged when it cannot apply)
    def _module_range(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        t = self.module_types[rng.integers(len(self.module_types))]
        a, b = sorted(rng.integers(len(self.layers), size=2))
        lo, hi = self.layers[a], self.layers[b]
        mask = (self.module == t) & (self.layer >= lo) & (self.layer <= hi)
        y = x.copy()
        y[mask] = rng.integers(self.n_opt)
        return y

    def _shift_k(self, x: np.ndarray, rng: np.random.Generator, up: bool) -> np.ndarray:
        nxt = (self.up if up else self.down)[np.arange(self.n), x]
        movable = np.flatnonzero(nxt >= 0)
        if len(movable) == 0:
            return x
        k = int(rng.integers(1, max(2, len(movable) // 4) + 1))
        k = min(k, len(movable))
        if self.costs is None:
            chosen = rng.choice(movable, size=k, replace=False)
        else:
            rows = movable
            d_cost = self.costs[rows, nxt[rows]] - self.costs[rows, x[rows]]
            d_bits = np.abs(self.matrix_bits[rows, nxt[rows]] - self.matrix_bits[rows, x[rows]])
            rate = d_cost / np.maximum(d_bits, 1e-12)  # up: most negative = most sensitive
            order = np.argsort(rate, kind="stable")
            chosen = rows[order[:k]]
        y = x.copy()
        y[chosen] = nxt[chosen]
        return y

    def _block_swap(self, x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() < 0.5:
            mask = self.module == self.module_types[rng.integers(len(self.module_types))]
        else:
            mask = self.layer == self.layers[rng.integers(len(self.layers))]
        y = x.copy()
        for i in np.flatnonzero(mask):
            alts = self.same_bits[x[i]]
            if alts:
                y[i] = alts[rng.integers(len(alts))]
        return y

    def _crossover(self, x: np.ndarray, other: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if rng.random() < 0.5 and len(self.layers) > 1:
            cut = self.layers[rng.integers(1, len(self.layers))]
            mask = self.layer < cut if rng.random() < 0.5 else self.layer >= cut
        else:
            picked = [t for t in self.module_types if rng.random() < 0.5]
            mask = np.isin(self.module, picked)
        return np.where(mask, other, x)

    def mutate(
        self, bases: np.ndarray, rng: np.random.Generator, n_moves: int | None = None
    ) -> np.ndarray:
        x = bases[rng.integers(len(bases))]
        n_moves = n_moves or int(rng.choice([1, 1, 1, 2, 2, 3]))
        for _ in range(n_moves):
            r = rng.random()
            if r < 0.3:
                x = self._module_range(x, rng)
            elif r < 0.6:
                x = self._shift_k(x, rng, up=rng.random() < 0.5)
            elif r < 0.8:
                x = self._block_swap(x, rng)
            else:
                x = self._crossover(x, bases[rng.integers(len(bases))], rng)
        return x

    def generate(
        self,
        bases: Sequence[Configuration],
        n: int,
        exclude: Iterable[Configuration],
        rng: np.random.Generator,
        *,
        include: Sequence[Configuration] = (),
    ) -> list[Configuration]:
        """Up to ``n`` distinct valid configurations, none in ``exclude``.

        ``include`` (e.g. optimal allocations) enter first, when not excluded.
        """
        space = self.f.space
        seen = set(exclude)
        out: list[Configuration] = []
        for c in include:
            if len(out) >= n:
                break
            if c not in seen:
                seen.add(c)
                out.append(space.validate(c))
        base_idx = np.stack([self.f.indices(c) for c in bases])
        opts = space.options
        names = [m.name for m in space.matrices]
        for _ in range(20 * n):
            if len(out) >= n:
                break
            x = self.mutate(base_idx, rng)
            c = Configuration({nm: opts[j] for nm, j in zip(names, x, strict=True)})
            if c in seen:
                continue
            seen.add(c)
            out.append(space.validate(c))
        return out


# -- the search -------------------------------------------------------------------------------
@dataclass
class SearchEpochLog:
    """What one search epoch did; ``ref_point`` and hypervolumes are in (bits, loss), minimised."""

    epoch: int
    set_size: int  # configurations in the set handed in (re-evaluated this epoch)
    candidates: int  # new valid configurations generated
    proposed: int  # picked by the acquisition
    evaluated: int  # losses measured this epoch (set + proposals)
    new_in_set: int  # configurations in the next set that were not in the previous one
    proposals_in_set: int  # of the proposals, how many entered the next set
    next_size: int
    segments_occupied: int
    ref_point: list[float]
    hv_before: float  # the re-evaluated set
    hv_after: float  # set + proposals, same reference point
    acquisition: str  # "qLogEHVI", or "random" when the GP could not be fitted
    fit_seconds: float
    seconds: float
    best_loss: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cost_array(space: ConfigSpace, costs: CostTable | np.ndarray | None) -> np.ndarray | None:
    if costs is None:
        return None
    arr = costs.for_space(space) if isinstance(costs, CostTable) else np.asarray(costs, float)
    if arr.shape != (len(space.matrices), len(space.options)):
        raise ValueError(
            f"allocation costs have shape {arr.shape}, expected "
            f"{(len(space.matrices), len(space.options))} (matrices x options)"
        )
    return arr


def _without_compiled_acquisition() -> None:
    """Keep botorch on its PyTorch qLogEHVI path.

    On first use, botorch 0.18 JIT-compiles a fused C++ kernel for this acquisition and caches
    it under ``~/.cache/torch_extensions``. The compile took 45 s of SmolLM2's first search on
    2 cores, and every fresh machine or CI runner pays it again (a machine with no compiler
    only gets a warning). The PyTorch path picks the same configurations about 0.7 s slower
    per epoch on 256 candidates. A kernel that is already loaded is kept."""
    from botorch.acquisition.multi_objective import logei

    if getattr(logei, "_C", None) is None:
        logei._load_attempted = True


class ParetoSearch:
    """The epoch hook that grows and prunes the training configuration set.

    ``eval_batches``: held-out batches (a few), never training batches. ``allocation_costs``: a
    ``CostTable`` (or array, space order) enabling optimal-allocation starts and
    sensitivity-guided moves. ``log_path``: a JSONL file, one ``SearchEpochLog`` per line.
    ``bits_range``: the budgets the bundle serves (its sweep); the starting set's allocations,
    the segments and the proposals stay within it, so no step trains a configuration cheaper
    than the cheapest a device can ask for. None: the space's whole range.
    """

    def __init__(
        self,
        space: ConfigSpace,
        *,
        eval_batches: Iterable[Batch],
        segments: int = 8,
        proposals_per_epoch: int = 6,
        candidates: int = 256,
        seed: int = 0,
        log_path: str | Path | None = None,
        allocation_costs: CostTable | np.ndarray | None = None,
        max_set_size: int = 64,
        allocation_budgets: int = 24,
        mc_samples: int = 128,
        rescore: int | None = None,
        bits_range: tuple[float, float] | None = None,
    ) -> None:
        if segments < 1 or proposals_per_epoch < 1 or candidates < 1:
            raise ValueError("segments, proposals_per_epoch and candidates must be >= 1")
        if rescore is not None and rescore < 2:
            raise ValueError(f"rescore must be >= 2 (both ends of the set), got {rescore}")
        if max_set_size < segments:
            raise ValueError(f"max_set_size ({max_set_size}) must be >= segments ({segments})")
        self.space = space
        self.eval_batches = list(eval_batches)
        if not self.eval_batches:
            raise ValueError("the search needs held-out evaluation batches")
        self.segments = segments
        self.q = proposals_per_epoch
        self.n_candidates = candidates
        self.seed = seed
        self.log_path = None if log_path is None else Path(log_path)
        self.costs = _cost_array(space, allocation_costs)
        self.max_set_size = max_set_size
        self.allocation_budgets = allocation_budgets
        self.mc_samples = mc_samples
        # None: re-evaluate the whole set every epoch; n: at most n of it (``_losses``)
        self.rescore = rescore
        self._last_loss: dict[Configuration, float] = {}
        self.features = ConfigFeatures(space, self.costs)
        self.generator = CandidateGenerator(self.features, self.costs)
        self.lo, self.hi = space.min_bits(), space.max_bits()
        if bits_range is not None:
            lo, hi = float(bits_range[0]), float(bits_range[1])
            if lo > hi:
                raise ValueError(f"bits_range must be (lo, hi) with lo <= hi, got {bits_range}")
            self.lo, self.hi = min(max(self.lo, lo), self.hi), max(min(self.hi, hi), self.lo)
        # a proposal below the allocation at ``lo`` serves no budget better (``_served``)
        self._floor: float | None = None
        self.history: list[SearchEpochLog] = []
        self.seen: set[Configuration] = set()
        self._allocations: list[Configuration] | None = None
        # the last epoch's measurements: (configuration, bits, loss), and what it proposed
        self.last_evaluation: list[tuple[Configuration, float, float]] = []
        self.last_proposals: list[Configuration] = []

    # -- starting set ---------------------------------------------------------------------
    def initial_set(self, n_budgets: int = 50) -> list[Configuration]:
        """The starting set: optimal allocations at ``n_budgets`` budgets over [lo, hi] with a
        cost table, else the cheapest and every uniform configuration plus random mixes."""
        if self.costs is not None:
            out = initial_configurations(self.space, self.costs, n_budgets, self.lo, self.hi)
            self._allocations = list(out)
            return out
        # the cheapest configuration anchors the low end (no uniform one may reach it: padding
        # makes the cheapest option differ between matrices)
        uniform = list(
            dict.fromkeys(
                [self.space.cheapest()] + [self.space.uniform(o) for o in self.space.options]
            )
        )
        uniform.sort(key=self.space.bits)
        if n_budgets <= len(uniform):
            return [uniform[i] for i in _spread(len(uniform), n_budgets)]
        out = dict.fromkeys(uniform)
        extra = random_configurations(self.space, n_budgets, seed=self.seed)
        for c in extra:
            if len(out) >= n_budgets:
                break
            out.setdefault(self.space.validate(c), None)
        return list(out)

    def _allocation_bases(self) -> list[Configuration]:
        if self.costs is None:
            return []
        if self._allocations is None:
            budgets = np.linspace(self.lo, self.hi, self.allocation_budgets)
            self._allocations = list(
                dict.fromkeys(allocate(self.space, self.costs, float(b)) for b in budgets)
            )
        return self._allocations

    def _served(self, config: Configuration) -> bool:
        """Within the budgets the bundle serves: no cheaper than the allocation at ``lo``
        (bits a little under ``lo`` still serve it), no dearer than ``hi``."""
        if self._floor is None:
            bases = self._allocation_bases()
            self._floor = min(map(self.space.bits, bases)) if bases else self.lo
        return self._floor - 1e-9 <= self.space.bits(config) <= self.hi + 1e-9

    # -- one epoch ------------------------------------------------------------------------
    def _evaluate(self, model: CoALoRAModel, configs: Sequence[Configuration]) -> list[float]:
        return [float(v) for v in evaluate_configs(model, configs, self.eval_batches, "loss")]

    def __call__(
        self, epoch: int, model: CoALoRAModel, config_set: Sequence[Configuration]
    ) -> list[Configuration]:
        t0 = time.perf_counter()
        notes: list[str] = []
        rng = np.random.default_rng([self.seed, epoch])
        current = list(dict.fromkeys(self.space.validate(c) for c in config_set))
        bits = [self.space.bits(c) for c in current]
        losses, scored = self._losses(model, current, bits, notes)
        self.seen.update(current)
        ref = reference_point(bits, losses, bits_range=(self.lo, self.hi))
        hv_before = hypervolume_2d(np.stack([bits, losses], 1), ref)

        known = set(current)
        bases = current + [c for c in self._allocation_bases() if c not in known]
        pool = self.generator.generate(
            bases, self.n_candidates, self.seen, rng, include=self._allocation_bases()
        )
        pool = [c for c in pool if self._served(c)] or pool
        t_fit = time.perf_counter()
        # rank 0's picks: a GP fitted in two processes need not agree to the last bit
        picks, method = distributed.broadcast(
            self._propose(current, bits, losses, pool, ref, epoch, notes)
            if distributed.is_main()
            else None
        )
        fit_seconds = time.perf_counter() - t_fit
        proposals = [pool[i] for i in picks]
        new_losses = self._evaluate(model, proposals)
        new_bits = [self.space.bits(c) for c in proposals]
        self.seen.update(proposals)
        self._last_loss.update(zip(proposals, new_losses, strict=True))

        all_configs = current + proposals
        all_bits, all_losses = bits + new_bits, losses + new_losses
        hv_after = hypervolume_2d(np.stack([all_bits, all_losses], 1), ref)
        next_set = segmented_front(
            all_configs,
            all_bits,
            all_losses,
            self.segments,
            lo=self.lo,
            hi=self.hi,
            max_size=self.max_set_size,
        )
        before = set(current)
        occupied = len(set(_segment_of(np.array(all_bits), self.segments, self.lo, self.hi)))
        log = SearchEpochLog(
            epoch=epoch,
            set_size=len(current),
            candidates=len(pool),
            proposed=len(proposals),
            evaluated=scored + len(proposals),
            new_in_set=sum(c not in before for c in next_set),
            proposals_in_set=len(set(proposals) & set(next_set)),
            next_size=len(next_set),
            segments_occupied=occupied,
            ref_point=[float(ref[0]), float(ref[1])],
            hv_before=hv_before,
            hv_after=hv_after,
            acquisition=method,
            fit_seconds=round(fit_seconds, 3),
            seconds=round(time.perf_counter() - t0, 3),
            best_loss=float(min(all_losses)),
            notes=notes,
        )
        self.history.append(log)
        self.last_evaluation = list(zip(all_configs, all_bits, all_losses, strict=True))
        self.last_proposals = proposals
        if self.log_path is not None and distributed.is_main():
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            with self.log_path.open("a") as f:
                f.write(json.dumps(log.to_dict()) + "\n")
        return next_set

    def _losses(
        self,
        model: CoALoRAModel,
        current: list[Configuration],
        bits: list[float],
        notes: list[str],
    ) -> tuple[list[float], int]:
        """The set's losses under the current adapter, and how many were measured.

        With ``rescore`` = n and a larger set, only n configurations spread evenly over the
        set's bit range (both ends included) are measured; the others are estimated: their
        last measured loss shifted by the mean change the measured ones show since theirs,
        or, never measured, the measured losses interpolated at their bits. The search's cost
        then stays bounded as the set grows."""
        if self.rescore is None or len(current) <= self.rescore:
            losses = self._evaluate(model, current)
            self._last_loss.update(zip(current, losses, strict=True))
            return losses, len(current)
        order = np.argsort(bits, kind="stable")
        subset = sorted(int(order[i]) for i in _spread(len(current), self.rescore))
        measured = self._evaluate(model, [current[i] for i in subset])
        drift = [
            m - self._last_loss[current[i]]
            for i, m in zip(subset, measured, strict=True)
            if current[i] in self._last_loss
        ]
        shift = float(np.mean(drift)) if drift else 0.0
        xs = np.array([bits[i] for i in subset])
        ys = np.array(measured)
        losses = []
        by_index = dict(zip(subset, measured, strict=True))
        for i, c in enumerate(current):
            if i in by_index:
                losses.append(by_index[i])
            elif c in self._last_loss:
                losses.append(self._last_loss[c] + shift)
            else:
                losses.append(float(np.interp(bits[i], xs, ys)))
        self._last_loss.update((current[i], m) for i, m in by_index.items())
        notes.append(f"measured {len(subset)} of the set's {len(current)}, estimated the rest")
        return losses, len(subset)

    def _propose(
        self,
        configs: Sequence[Configuration],
        bits: Sequence[float],
        losses: Sequence[float],
        pool: Sequence[Configuration],
        ref: tuple[float, float],
        epoch: int,
        notes: list[str],
    ) -> tuple[list[int], str]:
        """Indices into ``pool`` of the ``q`` picks, and how they were scored."""
        q = min(self.q, len(pool))
        if q == 0:
            notes.append("no new candidate could be generated")
            return [], "none"
        if len(configs) >= 3 and np.ptp(losses) > 0:
            try:
                return self._ehvi_picks(configs, bits, losses, pool, ref, q, epoch), "qLogEHVI"
            except Exception as exc:  # a failed fit must not stop training
                notes.append(f"GP/acquisition failed ({type(exc).__name__}: {exc})")
        else:
            notes.append("too few distinct observations for a GP")
        rng = np.random.default_rng([self.seed, epoch, 1])
        return sorted(rng.choice(len(pool), size=q, replace=False).tolist()), "random"

    def _ehvi_picks(
        self,
        configs: Sequence[Configuration],
        bits: Sequence[float],
        losses: Sequence[float],
        pool: Sequence[Configuration],
        ref: tuple[float, float],
        q: int,
        epoch: int,
    ) -> list[int]:
        from botorch.acquisition.multi_objective.logei import (
            qLogExpectedHypervolumeImprovement,
        )
        from botorch.acquisition.multi_objective.objective import GenericMCMultiOutputObjective
        from botorch.fit import fit_gpytorch_mll
        from botorch.models import SingleTaskGP
        from botorch.models.transforms import Standardize
        from botorch.sampling import SobolQMCNormalSampler
        from botorch.utils.multi_objective.box_decompositions.non_dominated import (
            FastNondominatedPartitioning,
        )
        from gpytorch.mlls import ExactMarginalLogLikelihood

        _without_compiled_acquisition()
        dt = torch.float64
        X = torch.as_tensor(self.features(configs), dtype=dt)
        Y = -torch.as_tensor(losses, dtype=dt).unsqueeze(-1)  # botorch maximises
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jitter / optimiser notes on tiny data sets
            gp = SingleTaskGP(X, Y, outcome_transform=Standardize(m=1))
            fit_gpytorch_mll(ExactMarginalLogLikelihood(gp.likelihood, gp))
        gp.eval()
        features = self.features

        def objectives(samples: torch.Tensor, X: torch.Tensor | None = None) -> torch.Tensor:
            # bits are exact: read them from feature 0 instead of modelling them
            neg_bits = -features.bits_from_features(X).unsqueeze(-1).expand_as(samples[..., :1])
            return torch.cat([neg_bits, samples[..., :1]], -1)

        ref_max = torch.tensor([-ref[0], -ref[1]], dtype=dt)
        Y_obs = torch.stack(
            [-torch.as_tensor(bits, dtype=dt), -torch.as_tensor(losses, dtype=dt)], -1
        )
        objective = GenericMCMultiOutputObjective(objectives)
        C = torch.as_tensor(self.features(pool), dtype=dt)
        picked: list[int] = []
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # jitter notes on near-duplicate candidates
            # Greedy "believer" batch: each pick joins the front at its predicted loss, so the
            # next pick must improve on it. A joint q-point MC acquisition scores the same
            # thing but costs 2^q terms per candidate (q=6: ~20x slower on 256 candidates).
            believed = torch.stack(
                [-features.bits_from_features(C), gp.posterior(C).mean.squeeze(-1)], -1
            )
            for j in range(q):
                acq = qLogExpectedHypervolumeImprovement(
                    gp,
                    ref_point=ref_max.tolist(),
                    partitioning=FastNondominatedPartitioning(
                        ref_point=ref_max, Y=torch.cat([Y_obs, believed[picked]])
                    ),
                    sampler=SobolQMCNormalSampler(
                        torch.Size([self.mc_samples]), seed=self.seed * 7919 + epoch * 31 + j
                    ),
                    objective=objective,
                )
                v = torch.cat([acq(chunk[:, None, :]) for chunk in C.split(128)])
                v[picked] = -math.inf
                picked.append(int(v.argmax()))
        return picked
