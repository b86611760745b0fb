"""The Pareto configuration search: front helpers, features, candidates, one epoch, in train()."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from coalora.export.coa_lora import CoALoRAConfig, CoALoRAModel, train
from coalora.export.coa_lora.search import (
    CandidateGenerator,
    ConfigFeatures,
    ParetoSearch,
    hypervolume_2d,
    non_dominated,
    reference_point,
    segmented_front,
    segmented_front_indices,
)
from coalora.export.data import Batches
from coalora.export.models import config_space, tiny_llama

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _lm_batches(n: int = 64, length: int = 32, seed: int = 0) -> Batches:
    # A learnable pattern: each sequence counts up from a random start (mod 64).
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(4, 68, (n, 1), generator=g)
    ids = 4 + (start + torch.arange(length)) % 64
    return Batches({"input_ids": ids, "labels": ids}, batch_size=8, seed=seed)


def _space():
    return config_space(tiny_llama())


# -- front helpers --------------------------------------------------------------------------
def test_non_dominated_hand_made():
    pts = [[1, 5], [2, 3], [3, 4], [4, 1], [2, 3], [5, 5]]
    # [3,4] is dominated by [2,3]; [5,5] by everything; the duplicate [2,3] stays.
    assert non_dominated(pts).tolist() == [True, True, False, True, True, False]
    assert non_dominated(np.zeros((0, 2))).tolist() == []
    assert non_dominated([[1, 1]]).tolist() == [True]


def test_hypervolume_2d_hand_made_and_matches_botorch():
    from botorch.utils.multi_objective.hypervolume import Hypervolume

    pts = np.array([[1.0, 3.0], [2.0, 2.0], [3.0, 1.0], [2.5, 2.5]])
    # staircase to ref (4, 4): 3*1 + 2*1 + 1*1
    assert hypervolume_2d(pts, (4, 4)) == pytest.approx(6.0)
    assert hypervolume_2d(pts[:1], (4, 4)) == pytest.approx(3.0)
    assert hypervolume_2d([[5.0, 0.0]], (4, 4)) == 0.0  # beyond the reference
    rng = np.random.default_rng(0)
    p = rng.random((40, 2))
    ref = (1.1, 1.2)
    d = torch.float64
    want = Hypervolume(-torch.tensor(ref, dtype=d)).compute(-torch.tensor(p, dtype=d))
    assert hypervolume_2d(p, ref) == pytest.approx(float(want), rel=1e-9)


def test_reference_point_is_strictly_worse_than_every_point():
    rng = np.random.default_rng(1)
    bits, losses = 2 + 6 * rng.random(30), 3 + rng.random(30)
    rb, rl = reference_point(bits, losses, bits_range=(2.0, 8.5))
    assert rb > bits.max() and rb > 8.5 and rl > losses.max()
    assert hypervolume_2d(np.stack([bits, losses], 1), (rb, rl)) > 0
    # one distinct value still gives a strict margin
    rb, rl = reference_point([4.0, 4.0], [2.0, 2.0])
    assert rb > 4.0 and rl > 2.0


def test_segmented_front_covers_segments_and_keeps_no_dominated():
    rng = np.random.default_rng(2)
    n, segments, lo, hi = 200, 8, 2.0, 8.0
    bits = lo + (hi - lo) * rng.random(n)
    losses = 5 - 0.3 * bits + rng.random(n)
    idx = segmented_front_indices(bits, losses, segments, lo=lo, hi=hi)
    seg = np.clip(((bits - lo) / ((hi - lo) / segments)).astype(int), 0, segments - 1)
    assert set(seg[idx]) == set(seg)  # every occupied segment keeps a point
    for i in idx:  # nothing kept is dominated within its own segment
        same = seg == seg[i]
        better = (bits[same] <= bits[i]) & (losses[same] <= losses[i])
        strictly = (bits[same] < bits[i]) | (losses[same] < losses[i])
        assert not (better & strictly).any()
    # a cap keeps one point per occupied segment at least
    capped = segmented_front_indices(bits, losses, segments, lo=lo, hi=hi, max_size=segments)
    assert len(capped) == segments and set(seg[capped]) == set(seg)
    with pytest.raises(ValueError):
        segmented_front_indices(bits, losses, segments, lo=lo, hi=hi, max_size=3)


def test_segmented_front_on_configurations_drops_duplicates():
    space = _space()
    a, b, c = (space.uniform(o) for o in space.options[:3])
    configs = [a, b, a, c]
    out = segmented_front(configs, [2.0, 3.0, 2.0, 3.0], [1.0, 2.0, 1.5, 1.0], 1)
    # one segment: b (3 bits, loss 2) is dominated by c and by a
    assert out == [a]


# -- features and candidates ----------------------------------------------------------------
def test_features_are_low_dimensional_and_carry_exact_bits():
    space = _space()
    f = ConfigFeatures(space, costs=np.random.default_rng(0).random((len(space), 9)))
    assert "bits" in f.names and "bits:q" in f.names and "cost" in f.names
    assert f.dim <= 16  # vs one option per matrix (hundreds on a real model)
    configs = [space.uniform(o) for o in space.options]
    X = f(configs)
    assert X.shape == (len(configs), f.dim)
    assert X.min() >= 0 and X.max() <= 1
    got = f.bits_from_features(torch.as_tensor(X, dtype=torch.float64)).numpy()
    np.testing.assert_allclose(got, [space.bits(c) for c in configs], rtol=1e-12)


@pytest.mark.parametrize("with_costs", [False, True])
def test_candidates_are_valid_distinct_and_unseen(with_costs):
    space = _space()
    costs = (
        np.random.default_rng(0).random((len(space), len(space.options))) if with_costs else None
    )
    f = ConfigFeatures(space, costs)
    gen = CandidateGenerator(f, costs)
    bases = [space.uniform(o) for o in space.options]
    out = gen.generate(bases, 64, bases, np.random.default_rng(0))
    assert len(out) == 64 and len(set(out)) == 64
    assert not set(out) & set(bases)
    for c in out:
        assert space.validate(c) == c


def test_initial_set_spans_the_bit_range():
    space = _space()
    # error falls with bits, as a real cost table's does
    noise = np.random.default_rng(3).random((len(space), len(space.options)))
    costs = (1 + noise) * np.array([4.0**-o.bits for o in space.options])
    s = ParetoSearch(space, eval_batches=_lm_batches(16).head(1), allocation_costs=costs)
    milp = s.initial_set(n_budgets=12)
    bits = [space.bits(c) for c in milp]
    assert min(bits) == pytest.approx(space.min_bits())
    assert max(bits) > 8.0  # the 8-bit end is reached
    assert len(set(milp)) == len(milp) >= 6
    plain = ParetoSearch(space, eval_batches=_lm_batches(16).head(1)).initial_set(n_budgets=14)
    assert len(set(plain)) == 14
    assert min(map(space.bits, plain)) == pytest.approx(space.min_bits())


def test_bits_range_keeps_the_set_and_the_proposals_within_the_served_budgets():
    space = _space()
    noise = np.random.default_rng(3).random((len(space), len(space.options)))
    costs = (1 + noise) * np.array([4.0**-o.bits for o in space.options])
    span = space.max_bits() - space.min_bits()
    lo, hi = space.min_bits() + 0.3 * span, space.min_bits() + 0.7 * span  # cuts both ends
    s = ParetoSearch(
        space, eval_batches=_lm_batches(16).head(1), allocation_costs=costs, bits_range=(lo, hi)
    )
    start = s.initial_set(n_budgets=8)
    bits = [space.bits(c) for c in start]
    # the cheapest start is the allocation at lo (at most lo bits, and not much below)
    assert lo - 0.1 * span < min(bits) <= lo and max(bits) <= hi
    assert space.cheapest() not in start
    floor = min(bits)
    pool = s.generator.generate(start, 64, set(start), np.random.default_rng(0))
    assert any(not s._served(c) for c in pool)  # mutations do leave the range
    assert all(s._served(c) == (floor - 1e-9 <= space.bits(c) <= hi + 1e-9) for c in pool)
    # a range beyond the space is clipped to it; an inverted one is refused
    wide = ParetoSearch(space, eval_batches=_lm_batches(16).head(1), bits_range=(0.0, 99.0))
    assert (wide.lo, wide.hi) == (space.min_bits(), space.max_bits())
    with pytest.raises(ValueError, match="lo <= hi"):
        ParetoSearch(space, eval_batches=_lm_batches(16).head(1), bits_range=(6.0, 3.0))


# -- on a model -----------------------------------------------------------------------------
def _model() -> CoALoRAModel:
    base = tiny_llama()
    return CoALoRAModel(base, config_space(base), CoALoRAConfig(rank=4, lr=3e-3), kind="causal-lm")


def test_one_search_epoch_proposes_new_valid_configs(tmp_path):
    model = _model()
    space = model.space
    held_out = _lm_batches(n=24, seed=7).head(2)
    log_path = tmp_path / "search.jsonl"
    search = ParetoSearch(
        space, eval_batches=held_out, candidates=64, proposals_per_epoch=3, log_path=log_path
    )
    start = search.initial_set(n_budgets=8)
    train(model, _lm_batches(), start, steps=4, progress=False)
    next_set = search(0, model, start)

    proposals = search.last_proposals
    assert len(proposals) == 3
    for c in proposals:
        assert space.validate(c) == c
        assert c not in start
    log = search.history[-1]
    assert log.acquisition == "qLogEHVI", log.notes
    assert log.candidates == 64 and log.proposed == 3 and log.evaluated == len(start) + 3
    assert log.new_in_set > 0 and log.proposals_in_set > 0
    assert set(next_set) <= set(start) | set(proposals)
    measured = search.last_evaluation
    assert log.ref_point[0] > max(b for _, b, _ in measured)
    assert log.ref_point[1] > max(loss for _, _, loss in measured)
    assert log.hv_after >= log.hv_before > 0
    assert json.loads(log_path.read_text().splitlines()[0])["new_in_set"] == log.new_in_set


def test_search_runs_as_the_training_epoch_hook(monkeypatch):
    # botorch JIT-compiles a fused qLogEHVI kernel on first use (45 s on a fresh 2-core
    # machine): the search must never wait on a compiler
    from botorch.acquisition.multi_objective import logei
    from torch.utils import cpp_extension

    compiles: list[str] = []
    monkeypatch.setattr(logei, "_C", None)
    monkeypatch.setattr(logei, "_load_attempted", False)
    monkeypatch.setattr(cpp_extension, "load", lambda name, **_: compiles.append(name))
    model = _model()
    search = ParetoSearch(
        model.space,
        eval_batches=_lm_batches(n=16, seed=5).head(2),
        candidates=48,
        proposals_per_epoch=2,
        segments=4,
    )
    start = search.initial_set(n_budgets=6)
    result = train(
        model,
        _lm_batches(),
        start,
        steps=6,
        steps_per_epoch=2,
        on_epoch_end=search,
        progress=False,
    )
    assert [h.epoch for h in search.history] == [0, 1]  # between epochs, none after the last
    assert all(h.proposed == 2 for h in search.history)
    # the second epoch re-evaluated exactly the set the first returned
    assert search.history[1].set_size == search.history[0].next_size
    assert len(result.configs) == search.history[1].next_size
    assert all(h.acquisition == "qLogEHVI" for h in search.history)
    assert compiles == []
