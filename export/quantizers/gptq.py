"""GPTQ: column-by-column quantization with error feedback through the inverse Hessian.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers" (arXiv 2210.17323). For a matrix ``W`` [N, K] whose input has second-moment
matrix ``H = E[x x^T]`` [K, K], quantizing column ``k`` leaves an error that the columns not yet
quantized absorb through ``H^-1``, so that the layer's output error

    E ||(W - Q) x||^2 = tr((W - Q) H (W - Q)^T)

falls well below what rounding each weight alone reaches (that is the diagonal approximation
the ``search`` quantizer minimises). As in the paper: Cholesky factor of the damped inverse
Hessian, columns in natural order, lazy batches of ``_LAZY`` columns (the rank-1 updates stay
inside the batch, the batch's accumulated error reaches the rest with one matmul).

Block-aware for MatMulNBits: every ``block_size`` columns share one scale and integer zero
point, chosen when GPTQ reaches the block's first column, from the block's weights as updated
by the error feedback so far (``params="search"``: the clipping search of
``coalora.kernels.quantize``, weighted by diag(H); ``"minmax"``: min/max). The output is the
same ``QuantizedMatrix`` the other quantizers return: codes in [0, 2^bits - 1], integer zero
points, fp32 scales, padded tail codes equal to the zero point.
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from coalora.kernels.options import QuantOption
from coalora.kernels.quantize import QuantizedMatrix, quantize, weight_matrix

BlockParams = Literal["search", "minmax"]

# The paper's lazy batch; a multiple of every block size, so a block never spans two batches.
_LAZY = 128
# Relative damping added to H's diagonal (the paper's default: 1% of its mean).
DEFAULT_DAMP = 0.01


class Hessian:
    """A matrix input's H = E[x x^T] [K, K] and, computed once on first use, the factor GPTQ
    runs on: matrices that share an input (q/k/v, gate/up) share one ``Hessian``."""

    def __init__(self, matrix: np.ndarray, damp: float = DEFAULT_DAMP) -> None:
        h = np.asarray(matrix, dtype=np.float64)
        if h.ndim != 2 or h.shape[0] != h.shape[1] or not np.all(np.isfinite(h)):
            raise ValueError(f"a Hessian must be a finite square matrix, got shape {h.shape}")
        if damp <= 0:
            raise ValueError(f"damping must be positive, got {damp}")
        # float32 at rest (a 1536-wide input's is 9 MiB); float64 where it is factored.
        self.matrix = ((h + h.T) / 2).astype(np.float32)
        self.damp = damp
        self._factors: dict[bool, np.ndarray] = {}

    @property
    def size(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def diag(self) -> np.ndarray:
        """E[x_k^2]: the diagonal the ``search`` quantizer weights by."""
        return np.diag(self.matrix).astype(np.float32)

    def act_order(self) -> np.ndarray:
        """The columns by decreasing E[x_k^2]: GPTQ's "act-order" (the columns whose error costs
        most are quantized first, while the most columns are left to absorb it)."""
        return np.argsort(-self.diag, kind="stable")

    def factor(self, act_order: bool = False) -> np.ndarray:
        """Upper Cholesky factor U of the damped inverse (H + d I)^-1 = U^T U, float32, of H
        with its columns in natural order or in ``act_order``."""
        if act_order not in self._factors:
            h = self.matrix.astype(np.float64)
            if act_order:
                perm = self.act_order()
                h = h[np.ix_(perm, perm)]
            self._factors[act_order] = _inverse_cholesky(h, self.damp).astype(np.float32)
        return self._factors[act_order]


def _inverse_cholesky(h: np.ndarray, damp: float) -> np.ndarray:
    k = h.shape[0]
    h = h.copy()
    dead = np.diag(h) <= 0
    # A column whose input is always 0 cannot change the output: keep it off H's inverse.
    h[dead, dead] = 1.0
    mean = float(np.mean(np.diag(h)))
    for extra in (1.0, 10.0, 100.0):  # a rank-deficient H may need more damping
        try:
            low = np.linalg.cholesky(h + np.eye(k) * (extra * damp * mean))
            break
        except np.linalg.LinAlgError:
            continue
    else:
        raise ValueError("Hessian is not positive definite even after damping")
    inv_low = np.linalg.solve(low, np.eye(k))  # L^-1: H^-1 = L^-T L^-1
    return np.linalg.cholesky(inv_low.T @ inv_low).T


def _block_params(
    w: np.ndarray, option: QuantOption, diag: np.ndarray, params: BlockParams
) -> tuple[np.ndarray, np.ndarray]:
    """(scale [N], zero [N]) of one block's columns, as the ``search``/``rtn`` quantizer picks."""
    qm = quantize(
        w,
        QuantOption(option.bits, option.block_size),
        method="search" if params == "search" else "rtn",
        importance=diag if params == "search" else None,
    )
    return qm.scales[:, 0], qm.zero_points[:, 0].astype(np.float32)


def quantize_gptq(
    w: np.ndarray,
    option: QuantOption,
    hessian: Hessian | np.ndarray,
    *,
    params: BlockParams = "search",
    act_order: bool = False,
) -> QuantizedMatrix:
    """Quantize ``w`` [N, K] for ``option`` given its input's ``hessian`` [K, K] (E[x x^T]).

    ``act_order``: visit the columns by decreasing E[x_k^2]. A block's columns are then no
    longer visited together, so every block's scale and zero point are fixed first, from the
    weights before any feedback ("static groups"): the layout stays MatMulNBits'."""
    w = weight_matrix(w)
    n, k = w.shape
    hess = hessian if isinstance(hessian, Hessian) else Hessian(hessian)
    if hess.size != k:
        raise ValueError(f"hessian is {hess.size}x{hess.size}, the matrix has {k} inputs")
    diag = hess.diag
    u = hess.factor(act_order)

    bs, levels = option.block_size, option.levels
    nb = option.n_blocks(k)
    # Transposed ([K, N]): column k of W is a contiguous row, and so is each rank-1 update.
    # Row j of ``wt`` is column order[j] of W.
    order = hess.act_order() if act_order else np.arange(k)
    wt = np.ascontiguousarray(w.T[order])
    codes = np.empty((nb * bs, n), dtype=np.float32)
    scales = np.empty((nb, n), dtype=np.float32)
    zeros = np.empty((nb, n), dtype=np.float32)
    if act_order:  # static groups
        for b in range(nb):
            lo, hi = b * bs, min((b + 1) * bs, k)
            scales[b], zeros[b] = _block_params(w[:, lo:hi], option, diag[lo:hi], params)
    for i1 in range(0, k, _LAZY):
        i2 = min(i1 + _LAZY, k)
        w1 = wt[i1:i2].copy()
        err1 = np.empty_like(w1)
        u1 = u[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = int(order[i1 + i])
            b = col // bs
            if not act_order and col % bs == 0:
                end = min(col + bs, k) - i1
                scales[b], zeros[b] = _block_params(
                    w1[i:end].T, option, diag[col : col + end - i], params
                )
            s, z = scales[b], zeros[b]
            x = w1[i]
            q = np.clip(np.rint(x / s) + z, 0, levels)
            codes[col] = q
            e = (x - (q - z) * s) / u1[i, i]
            err1[i] = e
            if i + 1 < i2 - i1:
                w1[i + 1 :] -= u1[i, i + 1 :, None] * e[None, :]
        if i2 < k:
            wt[i2:] -= u[i1:i2, i2:].T @ err1

    codes = np.ascontiguousarray(codes.T)
    scales = np.ascontiguousarray(scales.T)
    zeros = np.ascontiguousarray(zeros.T)
    codes = codes.reshape(n, nb, bs)
    if nb * bs > k:  # padded tail codes equal the zero point, so they dequantize to exactly 0
        codes.reshape(n, -1)[:, k:] = zeros[:, -1:]
    return QuantizedMatrix(
        option=option,
        in_features=k,
        codes=codes.astype(np.uint8),
        scales=scales,
        zero_points=zeros.astype(np.uint8),
    )


def quadratic_error_rows(diff: np.ndarray, hessian: Hessian | np.ndarray) -> np.ndarray:
    """d_j H d_j^T per output row j of ``diff = W - Q``: each output's E[(D x)_j^2]."""
    h = hessian.matrix if isinstance(hessian, Hessian) else np.asarray(hessian)
    d = np.asarray(diff, dtype=np.float64)
    return np.einsum("nk,nk->n", d @ h.astype(np.float64), d)


def quadratic_error(diff: np.ndarray, hessian: Hessian | np.ndarray) -> float:
    """tr(D H D^T) for ``diff = W - Q``: the output error E||D x||^2 that H = E[x x^T] implies."""
    return float(quadratic_error_rows(diff, hessian).sum())


def hessian_error(w: np.ndarray, qm: QuantizedMatrix, hessian: Hessian | np.ndarray) -> float:
    """tr((W - Q) H (W - Q)^T) of a quantized matrix."""
    return quadratic_error(np.asarray(w, np.float64) - qm.dequantize(), hessian)
