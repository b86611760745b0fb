"""Next-token choice: greedy, temperature, and nucleus (top-p) sampling, seeded. Numpy only."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Below this a temperature only magnifies rounding: 1/T overflows float64 near 1e-308, and long
# before that the distribution is one-hot. Such temperatures are greedy.
GREEDY_BELOW = 1e-4
# numpy's generators take seeds in [0, 2**128); the CLI's are one 64-bit word.
MAX_SEED = 2**64 - 1


class NonFiniteLogitsError(RuntimeError):
    """The model produced NaN or infinite logits: its weights or adapter are damaged."""


@dataclass(frozen=True)
class SamplingParams:
    """``temperature == 0`` means greedy (so does any temperature below ``GREEDY_BELOW``);
    ``top_p`` keeps the smallest set of tokens whose probabilities sum to at least ``top_p``."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (self.temperature >= 0.0 and np.isfinite(self.temperature)):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0.0 < self.top_p <= 1.0):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, (int, np.integer))
            or not 0 <= self.seed <= MAX_SEED
        ):
            raise ValueError(f"seed must be a whole number in [0, 2**64 - 1], got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class Sampler:
    def __init__(self, params: SamplingParams):
        self.params = params
        self._rng = np.random.default_rng(params.seed)

    def __call__(self, logits: np.ndarray) -> int:
        """Pick a token from one row of logits [vocab]."""
        if not np.isfinite(logits).all():
            bad = int(np.count_nonzero(~np.isfinite(logits)))
            raise NonFiniteLogitsError(f"{bad} of {logits.size} logits are NaN or infinite")
        p = self.params
        if p.greedy:
            return int(np.argmax(logits))
        z = logits.astype(np.float64) / p.temperature
        z -= z.max()
        probs = np.exp(z)
        probs /= probs.sum()
        if p.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            cum = np.cumsum(probs[order])
            # Keep tokens up to and including the one that crosses top_p.
            keep = order[: int(np.searchsorted(cum, p.top_p) + 1)]
            kept = probs[keep] / probs[keep].sum()
            return int(keep[self._rng.choice(len(keep), p=kept)])
        return int(self._rng.choice(len(probs), p=probs))
