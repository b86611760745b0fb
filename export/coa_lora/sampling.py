"""Which configurations of the training set a step trains on.

- ``uniform``   ``k`` distinct configurations drawn uniformly (``train.sample_configs``)
- ``sandwich``  the cheapest and the dearest configuration of the set (fewest / most bits),
                the others drawn without replacement with probability proportional to their
                current loss (an exponential average of the losses they scored when drawn;
                a configuration not drawn yet counts as the worst seen, so it gets its turn).
                With ``k = 2`` the step takes one end of the set (cheapest on even steps,
                dearest on odd ones) and one loss-weighted draw, with ``k = 1`` one
                loss-weighted draw: the ends then stay covered without a third pass per step.
- ``floor``     the cheapest configuration every step, the others loss-weighted as above
                (the dearest is not forced): the allocation a device runs at the lowest
                served budget gets as many passes as a LoRA trained on it alone.

Every draw is a function of (seed, step) and the losses recorded so far, so a resumed run
repeats an uninterrupted one when the sampler's state is checkpointed (``state``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from coalora.export.coa_lora.config import SAMPLERS
from coalora.kernels.config import ConfigSpace, Configuration

_EMA = 0.5  # weight of the newest loss in a configuration's running loss


class ConfigSampler:
    """Draws each step's configurations; ``observe`` feeds back the losses they scored."""

    def __init__(self, kind: str, k: int, seed: int, space: ConfigSpace) -> None:
        if kind not in SAMPLERS:
            raise ValueError(f"unknown sampler {kind!r}: expected one of {', '.join(SAMPLERS)}")
        if k < 1:
            raise ValueError(f"configurations per step must be >= 1, got {k}")
        if kind == "floor" and k < 2:  # one per step would train the cheapest alone
            raise ValueError("the floor sampler needs at least 2 configurations per step")
        self.kind, self.k, self.seed, self.space = kind, k, seed, space
        self.losses: dict[Configuration, float] = {}

    def sample(self, configs: Sequence[Configuration], step: int) -> list[Configuration]:
        if self.kind == "uniform":
            from coalora.export.coa_lora.train import sample_configs

            return sample_configs(configs, self.k, self.seed, step)
        rng = np.random.default_rng([self.seed, step, 1])
        k = min(self.k, len(configs))
        bits = [self.space.bits(c) for c in configs]
        cheapest, dearest = int(np.argmin(bits)), int(np.argmax(bits))
        if self.kind == "floor":
            ends = [cheapest]
        elif k >= 3 or (k == 2 and cheapest == dearest):
            ends = list(dict.fromkeys([cheapest, dearest]))
        elif k == 2:
            ends = [cheapest if step % 2 == 0 else dearest]
        else:
            ends = []
        chosen = ends[:k]
        rest = [i for i in range(len(configs)) if i not in chosen]
        need = k - len(chosen)
        if need and rest:
            known = [v for v in self.losses.values() if np.isfinite(v)]
            worst = max(known) if known else 1.0
            w = np.array([self.losses.get(configs[i], worst) for i in rest], dtype=np.float64)
            w = np.maximum(w, 1e-12)
            pick = rng.choice(len(rest), size=min(need, len(rest)), replace=False, p=w / w.sum())
            chosen += [rest[int(i)] for i in pick]
        return [configs[i] for i in chosen]

    def observe(self, configs: Sequence[Configuration], losses: Sequence[float]) -> None:
        for c, loss in zip(configs, losses, strict=True):
            old = self.losses.get(c)
            self.losses[c] = float(loss) if old is None else (1 - _EMA) * old + _EMA * float(loss)

    # -- checkpoint (JSON) ---------------------------------------------------------------------
    def state(self) -> list[dict[str, Any]]:
        return [{"config": c.to_dict(), "loss": v} for c, v in self.losses.items()]

    def load_state(self, state: Sequence[dict[str, Any]]) -> None:
        self.losses = {self.space.config_from_dict(s["config"]): float(s["loss"]) for s in state}
