"""Bit allocation: exact optimum, never over budget, monotone in the budget."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from coalora.export.allocation import (
    BudgetError,
    CostTable,
    allocate,
    allocation_curve,
    budget_limit,
    configuration_cost,
    cost_table,
    option_histogram,
    smallest_budget,
)
from coalora.kernels import ConfigSpace, MatrixSpec, QuantOption

SMALL_OPTIONS = (QuantOption(2, 32), QuantOption(4, 64), QuantOption(8, 128))
# Widths that are not multiples of 128 exercise the padded last block in the bit counts.
SMALL_SHAPES = ((32, 96), (64, 96), (96, 160), (48, 64))


def small_space(options=SMALL_OPTIONS) -> ConfigSpace:
    return ConfigSpace(
        [MatrixSpec(f"model.layers.{i}.mlp.up_proj", *s) for i, s in enumerate(SMALL_SHAPES)],
        options,
    )


def random_costs(space: ConfigSpace, rng: np.random.Generator) -> np.ndarray:
    # Mostly "more bits, less error", with noise so that some options are dominated.
    bits = np.array([[o.bits for o in space.options]], dtype=float)
    scale = rng.lognormal(0.0, 1.5, size=(len(space), 1))
    return scale * 4.0 ** (-bits) * rng.uniform(0.3, 3.0, size=(len(space), len(space.options)))


def brute_force(space: ConfigSpace, costs: np.ndarray, budget: float) -> float | None:
    limit = budget_limit(space, budget)
    best = None
    for choice in itertools.product(range(len(space.options)), repeat=len(space)):
        picked = zip(space.matrices, choice, strict=True)
        used = sum(space.option_bits(m, space.options[c]) for m, c in picked)
        if used <= limit:
            cost = sum(costs[i, c] for i, c in enumerate(choice))
            best = cost if best is None else min(best, cost)
    return best


def total_bits(space: ConfigSpace, config) -> int:
    return 8 * space.nbytes(config)


@pytest.mark.parametrize("seed", range(6))
def test_allocation_equals_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    space = small_space()
    costs = random_costs(space, rng)
    budgets = rng.uniform(space.min_bits(), space.max_bits(), size=5)
    for budget in [*budgets, space.min_bits(), space.max_bits()]:
        cfg = allocate(space, costs, float(budget))
        assert total_bits(space, cfg) <= budget_limit(space, float(budget))
        expected = brute_force(space, costs, float(budget))
        assert expected is not None
        assert configuration_cost(space, costs, cfg) == pytest.approx(expected, rel=1e-9)


def test_never_over_budget_on_a_fine_grid() -> None:
    rng = np.random.default_rng(7)
    shapes = [(576, 576), (192, 576), (1536, 576), (576, 1536), (96, 160)] * 6
    space = ConfigSpace(
        [MatrixSpec(f"model.layers.{i}.self_attn.q_proj", *s) for i, s in enumerate(shapes)]
    )
    costs = random_costs(space, rng)
    for budget in np.linspace(space.min_bits(), space.max_bits(), 25):
        cfg = allocate(space, costs, float(budget))
        assert total_bits(space, cfg) <= budget_limit(space, float(budget))
        assert space.bits(cfg) <= float(budget) * (1 + 1e-12)


def test_uniform_option_is_feasible_at_its_own_bits_and_never_beats_the_optimum() -> None:
    rng = np.random.default_rng(3)
    space = small_space()
    costs = random_costs(space, rng)
    for opt in space.options:
        uniform = space.uniform(opt)
        cfg = allocate(space, costs, space.bits(uniform))
        assert configuration_cost(space, costs, cfg) <= configuration_cost(space, costs, uniform)


def test_more_budget_never_costs_more() -> None:
    rng = np.random.default_rng(11)
    space = small_space()
    costs = random_costs(space, rng)
    budgets = list(np.linspace(space.min_bits(), space.max_bits(), 30))
    errors = [err for _, _, err in allocation_curve(space, costs, budgets)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(errors[:-1], errors[1:], strict=True))


def test_budget_below_the_cheapest_names_the_smallest_feasible_budget() -> None:
    space = small_space()
    costs = np.ones((len(space), len(space.options)))
    floor = smallest_budget(space)
    with pytest.raises(BudgetError, match=f"{floor:.4f}"):
        allocate(space, costs, floor - 0.05)
    # The budget named in the message is itself feasible.
    cfg = allocate(space, costs, floor)
    assert cfg == space.cheapest()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_nonsense_budgets_are_refused(bad: float) -> None:
    space = small_space()
    with pytest.raises(BudgetError):
        allocate(space, np.ones((len(space), len(space.options))), bad)


def test_costs_must_match_the_space() -> None:
    space = small_space()
    with pytest.raises(ValueError, match="shape"):
        allocate(space, np.ones((2, 2)), 5.0)


def test_cost_table_is_reordered_to_the_space() -> None:
    rng = np.random.default_rng(5)
    space = small_space()
    costs = random_costs(space, rng)
    names = tuple(m.name for m in space.matrices)
    # Same numbers, rows and columns reversed: allocate must line them up by name and option.
    table = CostTable(names[::-1], space.options[::-1], costs[::-1, ::-1].copy())
    assert allocate(space, table, 4.0) == allocate(space, costs, 4.0)
    cfg = allocate(space, table, 4.0)
    assert table.total(cfg) == pytest.approx(configuration_cost(space, costs, cfg))


def test_cost_table_search_beats_round_to_nearest() -> None:
    rng = np.random.default_rng(0)
    weights = {
        "model.layers.0.self_attn.q_proj": rng.standard_normal((16, 96)).astype(np.float32),
        "model.layers.0.mlp.down_proj": rng.standard_normal((8, 160)).astype(np.float32),
    }
    moments = {name: rng.gamma(1.0, 1.0, size=w.shape[1]) for name, w in weights.items()}
    search = cost_table(weights, moments, SMALL_OPTIONS, method="search", progress=False)
    rtn = cost_table(weights, moments, SMALL_OPTIONS, method="rtn", progress=False)
    assert search.costs.shape == (2, len(SMALL_OPTIONS))
    assert np.all(search.costs > 0)
    assert np.all(search.costs <= rtn.costs * (1 + 1e-5))
    # More bits, less error.
    assert np.all(np.diff(search.costs, axis=1) < 0)
    with pytest.raises(ValueError, match="moments"):
        cost_table(weights, {}, SMALL_OPTIONS, progress=False)


def test_option_histogram_counts_in_option_order() -> None:
    space = small_space()
    cfg = space.validate(
        {m.name: ("8b128" if i == 0 else "2b32") for i, m in enumerate(space.matrices)}
    )
    assert option_histogram(cfg) == {"2b32": 3, "8b128": 1}
