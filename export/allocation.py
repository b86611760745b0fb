"""Sensitivity-weighted costs and the exact per-matrix bit allocation under a budget.

Cost of giving matrix i option o (calibration-weighted output error, diagonal approximation):

    cost[i, o] = sum_k E[x_k^2] * ||W_i[:, k] - Q_o(W_i)[:, k]||^2

with ``Q_o`` the search quantizer steered by the same E[x_k^2]. The allocation is the multiple-
choice knapsack

    min  sum_{i,o} cost[i, o] x[i, o]
    s.t. sum_o x[i, o] = 1                      (one option per matrix)
         sum_{i,o} bits[i, o] x[i, o] <= B      (bits[i, o] = space.option_bits: exact integers)
         x binary

solved to proven optimality (zero gap) by HiGHS through ``scipy.optimize.milp``. The budget is
bits per weight over the quantized matrices; B = floor(budget * total_params), in integers, so a
returned configuration is never over budget.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from coalora.export.quantizers import Hessian, output_error, quantize_matrix
from coalora.kernels import ConfigSpace, Configuration, QuantOption

# One error for a budget that cannot be read or met, on both sides (the message says which).
from coalora.runtime.budget import BudgetError

# A budget computed as a configuration's own bits (8 * bytes / params) may land a rounding error
# below that integer; this relative slack admits it, far below one bit of the total.
_BUDGET_RTOL = 1e-12


@dataclass(frozen=True)
class CostTable:
    """``costs[i, o]``: weighted error of matrix ``matrices[i]`` under ``options[o]``."""

    matrices: tuple[str, ...]
    options: tuple[QuantOption, ...]
    costs: np.ndarray  # float64 [n_matrices, n_options]

    def for_space(self, space: ConfigSpace) -> np.ndarray:
        """The cost array in ``space``'s matrix and option order."""
        row = {name: i for i, name in enumerate(self.matrices)}
        col = {opt: j for j, opt in enumerate(self.options)}
        try:
            rows = [row[m.name] for m in space.matrices]
            cols = [col[o] for o in space.options]
        except KeyError as exc:
            raise ValueError(f"cost table has no entry for {exc.args[0]}") from None
        return self.costs[np.ix_(rows, cols)]

    def total(self, config: Mapping[str, QuantOption]) -> float:
        """Summed weighted error of a configuration."""
        col = {opt: j for j, opt in enumerate(self.options)}
        return float(sum(self.costs[i, col[config[name]]] for i, name in enumerate(self.matrices)))

    def uniform_total(self, option: QuantOption) -> float:
        return float(self.costs[:, self.options.index(option)].sum())


def cost_table(
    weights: Mapping[str, np.ndarray],
    moments: Mapping[str, np.ndarray],
    options: Iterable[QuantOption],
    *,
    method: str = "search",
    progress: bool | None = None,
    hessians: Mapping[str, Hessian] | None = None,
) -> CostTable:
    """Quantize every (matrix, option) once and record its calibration-weighted error.

    ``method="rtn"`` gives the round-to-nearest baseline's costs (same weighting, for
    comparison). With ``hessians`` (required by ``method="gptq"``) the error is the full
    tr((W-Q) H (W-Q)^T) instead of its diagonal. ``progress=None`` shows a bar only on a
    terminal.
    """
    from tqdm.auto import tqdm

    names = tuple(weights)
    opts = tuple(options)
    missing = [n for n in names if n not in moments]
    if missing:
        raise ValueError(f"no calibration moments for matrix {missing[0]!r}")
    costs = np.zeros((len(names), len(opts)), dtype=np.float64)
    bar = tqdm(
        total=len(names) * len(opts),
        desc=f"cost table ({method})",
        unit="q",
        disable=None if progress is None else not progress,
        leave=False,
    )
    with bar:
        for i, name in enumerate(names):
            w, imp = weights[name], np.asarray(moments[name], dtype=np.float64)
            hess = None if hessians is None else hessians[name]
            for j, opt in enumerate(opts):
                qm = quantize_matrix(w, opt, method, importance=imp, hessian=hess)
                costs[i, j] = output_error(w - qm.dequantize(), importance=imp, hessian=hess)
                bar.update(1)
    return CostTable(names, opts, costs)


def budget_limit(space: ConfigSpace, budget_bits: float) -> int:
    """The budget as an integer number of bits over all quantized matrices."""
    if not math.isfinite(budget_bits) or budget_bits <= 0:
        raise BudgetError(f"budget must be a positive number of bits per weight, got {budget_bits}")
    return math.floor(budget_bits * space.total_params * (1.0 + _BUDGET_RTOL))


def smallest_budget(space: ConfigSpace) -> float:
    """The smallest budget (bits per weight, rounded up to 1e-4) any configuration meets."""
    cheapest = sum(min(space.option_bits(m, o) for o in space.options) for m in space.matrices)
    return math.ceil(cheapest / space.total_params * 1e4) / 1e4


def check_budget(space: ConfigSpace, budget_bits: float) -> int:
    """The budget's integer bit limit; raises ``BudgetError`` if no configuration meets it."""
    limit = budget_limit(space, budget_bits)
    cheapest = sum(min(space.option_bits(m, o) for o in space.options) for m in space.matrices)
    if cheapest > limit:
        raise BudgetError(
            f"budget {budget_bits:g} bits per weight is below the smallest feasible budget "
            f"{smallest_budget(space):.4f} (every matrix at its cheapest option)"
        )
    return limit


def _as_array(space: ConfigSpace, costs: CostTable | np.ndarray) -> np.ndarray:
    arr = costs.for_space(space) if isinstance(costs, CostTable) else np.asarray(costs, float)
    if arr.shape != (len(space.matrices), len(space.options)):
        raise ValueError(
            f"costs have shape {arr.shape}, expected "
            f"{(len(space.matrices), len(space.options))} (matrices x options)"
        )
    if not np.all(np.isfinite(arr)):
        raise ValueError("costs hold NaN or infinite values")
    return arr


def _bit_table(space: ConfigSpace) -> np.ndarray:
    return np.array(
        [[space.option_bits(m, o) for o in space.options] for m in space.matrices], dtype=np.int64
    )


@contextlib.contextmanager
def _quiet_stdout() -> Iterator[None]:
    """Silence C-level writes to fd 1: HiGHS prints solver notes there, which would corrupt a
    CLI's JSON output."""
    try:
        sys.stdout.flush()
        saved = os.dup(1)
    except (OSError, ValueError):
        yield
        return
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def allocate(
    space: ConfigSpace, costs: CostTable | np.ndarray, budget_bits: float
) -> Configuration:
    """The configuration of least total cost whose bits per weight are <= ``budget_bits``."""
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    cost = _as_array(space, costs)
    bits = _bit_table(space)
    limit = check_budget(space, budget_bits)
    n, m = bits.shape
    # Scale the knapsack row by the bits' common divisor: same problem, smaller coefficients.
    unit = int(np.gcd.reduce(bits.ravel()))
    row_bits = (bits // unit).ravel().astype(np.float64)
    cap = limit // unit
    # Row i sums x[i, :] (variables are laid out matrix-major).
    one_each = csr_array((np.ones(n * m), (np.repeat(np.arange(n), m), np.arange(n * m))))
    # HiGHS stops within an absolute gap (1e-6) too: dividing by a lower bound of the optimum
    # (every matrix at its cheapest-error option) makes that gap relative, whatever the units.
    scale = float(cost.min(axis=1).sum())
    if scale <= 0:
        scale = float(np.abs(cost).max()) or 1.0
    c = (cost / scale).ravel()
    while True:
        with _quiet_stdout():
            res = milp(
                c,
                constraints=[
                    LinearConstraint(one_each, 1, 1),
                    LinearConstraint(row_bits[None, :], -np.inf, cap),
                ],
                integrality=np.ones(n * m),
                bounds=Bounds(0, 1),
                options={"mip_rel_gap": 0.0},
            )
        if res.status != 0 or res.x is None:
            raise RuntimeError(f"bit allocation failed: {res.message}")
        choice = res.x.reshape(n, m).argmax(axis=1)
        used = int((bits // unit)[np.arange(n), choice].sum())
        if used <= cap:
            break
        # HiGHS accepts solutions within its feasibility tolerance; integers decide here.
        cap -= used - cap
    return Configuration(
        {spec.name: space.options[choice[i]] for i, spec in enumerate(space.matrices)}
    )


def configuration_cost(
    space: ConfigSpace, costs: CostTable | np.ndarray, config: Mapping[str, QuantOption]
) -> float:
    """Summed weighted error of ``config``."""
    arr = _as_array(space, costs)
    col = {o: j for j, o in enumerate(space.options)}
    return float(sum(arr[i, col[config[m.name]]] for i, m in enumerate(space.matrices)))


def allocation_curve(
    space: ConfigSpace, costs: CostTable | np.ndarray, budgets: Sequence[float]
) -> list[tuple[float, Configuration, float]]:
    """(budget, optimal configuration, its weighted error) for every budget, in the given order."""
    out: list[tuple[float, Configuration, float]] = []
    for b in budgets:
        cfg = allocate(space, costs, b)
        out.append((b, cfg, configuration_cost(space, costs, cfg)))
    return out


def option_histogram(config: Mapping[str, QuantOption]) -> dict[str, int]:
    """How many matrices take each option, in option order."""
    counts: dict[QuantOption, int] = {}
    for opt in config.values():
        counts[opt] = counts.get(opt, 0) + 1
    return {opt.name: counts[opt] for opt in sorted(counts)}
