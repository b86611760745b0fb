from __future__ import annotations

import numpy as np
import pytest

from coalora.runtime.sampling import Sampler, SamplingParams


def test_greedy_takes_the_argmax() -> None:
    logits = np.array([0.1, 3.0, -1.0, 2.9], dtype=np.float32)
    assert Sampler(SamplingParams())(logits) == 1


def test_seeded_sampling_repeats_and_top_p_limits_the_support() -> None:
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(50).astype(np.float32) * 3
    a = [Sampler(SamplingParams(temperature=1.0, seed=7))(logits) for _ in range(3)]
    b = [Sampler(SamplingParams(temperature=1.0, seed=7))(logits) for _ in range(3)]
    assert a == b
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(-probs)
    allowed = set(order[: int(np.searchsorted(np.cumsum(probs[order]), 0.5) + 1)].tolist())
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.5, seed=1))
    picks = {s(logits) for _ in range(300)}
    assert picks <= allowed and len(picks) >= 1
    wide = Sampler(SamplingParams(temperature=1.0, seed=1))
    assert len({wide(logits) for _ in range(300)}) > len(allowed)


@pytest.mark.parametrize("kwargs", [{"temperature": -1.0}, {"top_p": 0.0}, {"top_p": 1.5}])
def test_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)
