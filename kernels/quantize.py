"""Block-wise asymmetric uniform quantization: w ~= (q - z) * s per block.

Two quantizers share one code path:

- ``quantize_rtn``: the baseline. Scale and zero point from the block's min/max, round to nearest.
- ``quantize`` (``method="search"``): the default. For every block it searches the clipping range
  on a grid (MSE-optimal clipping) and then alternates weighted least squares steps on
  (scale, zero point) with re-rounding, in the spirit of HQQ's half-quadratic updates, keeping a
  block's best result only when its error falls. The error is weighted by an optional
  per-input-column ``importance`` (calibration second moments E[x_k^2]), so the quantizer
  minimises ``E ||(W - Q(W)) x||^2`` under a diagonal approximation, which is the quantity that
  matters at the layer's output.

Zero points are integers in [0, 2^bits - 1], as MatMulNBits stores them (packed uint8).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from coalora.kernels.options import QuantOption

Method = Literal["rtn", "search"]

# Clipping ratios tried by the grid search (1.0 = plain min/max).
_CLIP_GRID = np.linspace(1.0, 0.55, 16, dtype=np.float32)
_REFINE_STEPS = 4


@dataclass
class QuantizedMatrix:
    """A quantized ``out_features x in_features`` matrix, codes not yet packed."""

    option: QuantOption
    in_features: int
    codes: np.ndarray  # uint8 [N, n_blocks, block_size]; padded tail holds the zero point
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: np.ndarray  # uint8 [N, n_blocks]

    @property
    def out_features(self) -> int:
        return int(self.codes.shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        return (self.out_features, self.in_features)

    def dequantize(self) -> np.ndarray:
        """float32 [N, K], exactly what the kernel multiplies by."""
        q = self.codes.astype(np.float32) - self.zero_points[..., None].astype(np.float32)
        w = q * self.scales[..., None]
        return w.reshape(self.out_features, -1)[:, : self.in_features]

    def nbytes(self) -> int:
        return self.option.nbytes(self.out_features, self.in_features)


def _blocks(w: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Split rows into blocks; returns (blocks [N, nb, block], valid-mask [nb, block])."""
    n, k = w.shape
    nb = -(-k // block)
    pad = nb * block - k
    mask = np.ones(nb * block, dtype=np.float32)
    if pad:
        # Edge padding leaves each block's min/max unchanged; the mask gives it zero weight.
        w = np.pad(w, ((0, 0), (0, pad)), mode="edge")
        mask[k:] = 0.0
    return w.reshape(n, nb, block), mask.reshape(nb, block)


def _scale_zero(lo: np.ndarray, hi: np.ndarray, levels: int) -> tuple[np.ndarray, np.ndarray]:
    """Scale and integer zero point that map [lo, hi] onto [0, levels].

    The range always includes 0: an integer zero point in [0, levels] can only place 0
    inside the grid, so a same-sign block would otherwise be clipped at one end.
    """
    lo = np.minimum(lo, 0.0)
    hi = np.maximum(hi, 0.0)
    span = hi - lo
    scale = np.where(span > 1e-12, span / levels, 1.0).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, levels).astype(np.float32)
    return scale, zero


def _round(wb: np.ndarray, scale: np.ndarray, zero: np.ndarray, levels: int) -> np.ndarray:
    return np.clip(np.rint(wb / scale[..., None]) + zero[..., None], 0, levels)


def _error(
    wb: np.ndarray, q: np.ndarray, scale: np.ndarray, zero: np.ndarray, weight: np.ndarray
) -> np.ndarray:
    d = wb - (q - zero[..., None]) * scale[..., None]
    return np.einsum("nbk,nbk,bk->nb", d, d, weight)


def _least_squares_step(
    wb: np.ndarray, q: np.ndarray, weight: np.ndarray, levels: int
) -> tuple[np.ndarray, np.ndarray]:
    """Best (scale, integer zero) for fixed codes: weighted LS fit of w ~ s*q + c, then z = -c/s."""
    sw = weight.sum(-1)[None]
    sq = np.einsum("nbk,bk->nb", q, weight)
    sqq = np.einsum("nbk,nbk,bk->nb", q, q, weight)
    sx = np.einsum("nbk,bk->nb", wb, weight)
    sqx = np.einsum("nbk,nbk,bk->nb", q, wb, weight)
    det = sw * sqq - sq * sq
    ok = det > 1e-20
    safe = np.where(ok, det, 1.0)
    s = np.where(ok, (sw * sqx - sq * sx) / safe, 0.0)
    c = np.where(ok, (sqq * sx - sq * sqx) / safe, 0.0)
    good = ok & (s > 1e-12)
    s = np.where(good, s, 1.0)
    z = np.clip(np.rint(-c / s), 0, levels)
    # Refit the scale for the rounded zero point.
    qz = q - z[..., None]
    num = np.einsum("nbk,nbk,bk->nb", wb, qz, weight)
    den = np.einsum("nbk,nbk,bk->nb", qz, qz, weight)
    s2 = np.where(den > 1e-20, num / np.where(den > 1e-20, den, 1.0), 0.0)
    good &= s2 > 1e-12
    return np.where(good, s2, np.nan).astype(np.float32), z.astype(np.float32)


def weight_matrix(w: np.ndarray) -> np.ndarray:
    """``w`` as a finite float32 2-D matrix, or ValueError."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight matrix, got shape {w.shape}")
    if not np.all(np.isfinite(w)):
        raise ValueError("weight matrix holds NaN or infinite values")
    return w


def quantize(
    w: np.ndarray,
    option: QuantOption,
    *,
    method: Method = "search",
    importance: np.ndarray | None = None,
) -> QuantizedMatrix:
    """Quantize a float matrix ``w`` [out_features, in_features] with ``option``.

    ``importance`` (length in_features, non-negative) weights the error of each input column;
    it only steers the search, the stored format is the same.
    """
    w = weight_matrix(w)
    n, k = w.shape
    levels = option.levels
    wb, mask = _blocks(w, option.block_size)
    if importance is None:
        weight = mask
    else:
        imp = np.asarray(importance, dtype=np.float32).reshape(-1)
        if imp.shape[0] != k or np.any(imp < 0) or not np.all(np.isfinite(imp)):
            raise ValueError(f"importance must be {k} finite non-negative values")
        imp = imp / max(float(imp.mean()), 1e-30)
        weight = _blocks(imp[None], option.block_size)[0][0] * mask

    lo = wb.min(-1)
    hi = wb.max(-1)
    scale, zero = _scale_zero(lo, hi, levels)
    q = _round(wb, scale, zero, levels)
    if method == "search":
        best_err = _error(wb, q, scale, zero, weight)
        # 1) MSE-optimal clipping: shrink the range towards its midpoint's zero.
        for ratio in _CLIP_GRID[1:]:
            s_c, z_c = _scale_zero(lo * ratio, hi * ratio, levels)
            q_c = _round(wb, s_c, z_c, levels)
            err = _error(wb, q_c, s_c, z_c, weight)
            better = err < best_err
            scale = np.where(better, s_c, scale)
            zero = np.where(better, z_c, zero)
            q = np.where(better[..., None], q_c, q)
            best_err = np.where(better, err, best_err)
        # 2) Alternate: least-squares (scale, zero) for the codes, then re-round the codes.
        for _ in range(_REFINE_STEPS):
            s_r, z_r = _least_squares_step(wb, q, weight, levels)
            valid = np.isfinite(s_r)
            s_r = np.where(valid, s_r, scale)
            z_r = np.where(valid, z_r, zero)
            q_r = _round(wb, s_r, z_r, levels)
            err = _error(wb, q_r, s_r, z_r, weight)
            better = err < best_err
            if not better.any():
                break
            scale = np.where(better, s_r, scale)
            zero = np.where(better, z_r, zero)
            q = np.where(better[..., None], q_r, q)
            best_err = np.where(better, err, best_err)
    elif method != "rtn":
        raise ValueError(f"unknown quantization method {method!r}: use 'rtn' or 'search'")

    codes = q.astype(np.uint8)
    zp = zero.astype(np.uint8)
    if mask.min() == 0.0:
        # Padded tail codes equal the zero point so they dequantize to exactly 0.
        pad = mask == 0.0
        codes[:, pad] = np.broadcast_to(zp[..., None], codes.shape)[:, pad]
    return QuantizedMatrix(
        option=option,
        in_features=k,
        codes=codes,
        scales=scale.astype(np.float32),
        zero_points=zp,
    )


def quantize_rtn(w: np.ndarray, option: QuantOption) -> QuantizedMatrix:
    """Round-to-nearest with min/max scale and zero point: the baseline."""
    return quantize(w, option, method="rtn")


def weighted_error(
    w: np.ndarray, qm: QuantizedMatrix, importance: np.ndarray | None = None
) -> float:
    """sum_k importance_k * ||w[:, k] - dequant(w)[:, k]||^2 (importance defaults to 1)."""
    d = np.asarray(w, dtype=np.float32) - qm.dequantize()
    col = np.einsum("nk,nk->k", d, d, dtype=np.float64)
    if importance is None:
        return float(col.sum())
    return float(np.dot(col, np.asarray(importance, dtype=np.float64)))
