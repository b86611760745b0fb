"""The exporter's quantizers, one entry point for every place that quantizes a matrix (the
adapter model's layers, the cost table, the bundle writer), so the codes trained against, the
allocator's error estimates and the shipped codes come from the same quantizer.

- ``rtn``     round-to-nearest, min/max scale and zero point (``coalora.kernels.quantize``)
- ``search``  per-block clipping search + least squares, weighted by E[x_k^2] (kernels)
- ``gptq``    column-by-column with error feedback through the inverse Hessian E[x x^T]
              (``gptq``); needs the matrix input's full Hessian (``hessians``)
- ``gptq-act`` the same, columns by decreasing E[x_k^2] ("act-order") with every block's
              scale and zero point fixed first ("static groups")

All of them emit the same MatMulNBits layout (codes, fp32 scales, integer zero points).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from coalora.export.quantizers.gptq import (
    Hessian,
    hessian_error,
    quadratic_error,
    quadratic_error_rows,
    quantize_gptq,
)
from coalora.kernels.options import QuantOption
from coalora.kernels.quantize import QuantizedMatrix, quantize

Quantizer = Literal["gptq", "gptq-act", "search", "rtn"]
QUANTIZERS: tuple[str, ...] = ("gptq", "gptq-act", "search", "rtn")
# The exporter's default, chosen by measurement (benchmarks/results/quantizer_quality.md):
# SmolLM2 with no adapter, MILP allocations on plain output-error costs, held-out perplexity
# at 2.5 / 3 / 3.5 bits 179 / 117 / 96.3 with gptq-act, 337 / 166 / 122 with gptq, 1050 / 417
# / 331 with search (gptq-act is below gptq at every budget up to 6 bits, and stays so on
# loss-weighted costs: 173 / 68.1 / 46.7 against 292 / 77.7 / 50.4).
DEFAULT_QUANTIZER: Quantizer = "gptq-act"


def needs_hessian(method: str) -> bool:
    return method in ("gptq", "gptq-act")


def quantize_matrix(
    w: np.ndarray,
    option: QuantOption,
    method: str,
    *,
    importance: np.ndarray | None = None,
    hessian: Hessian | None = None,
) -> QuantizedMatrix:
    """``w`` [N, K] quantized for ``option`` by ``method``; ``importance`` (E[x_k^2]) steers
    ``search``, ``hessian`` (E[x x^T]) is what ``gptq`` runs on."""
    if needs_hessian(method):
        if hessian is None:
            raise ValueError(f"the {method} quantizer needs the matrix input's Hessian")
        return quantize_gptq(w, option, hessian, act_order=method == "gptq-act")
    if method == "search":
        return quantize(w, option, method="search", importance=importance)
    if method == "rtn":
        return quantize(w, option, method="rtn")
    raise ValueError(f"unknown quantizer {method!r}: expected one of {', '.join(QUANTIZERS)}")


def output_error(
    diff: np.ndarray,
    *,
    importance: np.ndarray | None = None,
    hessian: Hessian | None = None,
    row_weights: np.ndarray | None = None,
) -> float:
    """The layer's output error for ``diff = W - Q(W)``: tr(D H D^T) with a Hessian, else its
    diagonal approximation sum_k E[x_k^2] ||D[:, k]||^2 (plain squared error without either).

    ``row_weights`` (one per output channel, e.g. E[(dL/dy_j)^2]) weigh each output's share of
    that error: sum_j w_j d_j H d_j^T.
    """
    d = np.asarray(diff, dtype=np.float64)
    if hessian is not None:
        rows = quadratic_error_rows(d, hessian)
    else:
        imp = np.ones(d.shape[1]) if importance is None else np.asarray(importance, np.float64)
        rows = (d * d) @ imp
    if row_weights is None:
        return float(rows.sum())
    w = np.asarray(row_weights, dtype=np.float64)
    if w.shape != (d.shape[0],):
        raise ValueError(f"row_weights has shape {w.shape}, expected ({d.shape[0]},)")
    return float(rows @ w)


__all__ = [
    "DEFAULT_QUANTIZER",
    "QUANTIZERS",
    "Hessian",
    "Quantizer",
    "hessian_error",
    "needs_hessian",
    "output_error",
    "quadratic_error",
    "quadratic_error_rows",
    "quantize_gptq",
    "quantize_matrix",
]
