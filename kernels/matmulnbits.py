"""onnxruntime's MatMulNBits layout (com.microsoft domain), as a small spec plus pack/unpack.

MatMulNBits computes ``Y = A @ W.T`` for a weight ``W`` [N, K] (out x in) stored block-wise:

    B            uint8 [N, n_blocks, block_size * bits / 8]  codes, low bits first in each byte:
                 element j of a block sits in byte j*bits//8 at bit offset (j*bits) % 8
    scales       float [N * n_blocks]                          row-major over (n, block)
    zero_points  uint8 [N * ceil(n_blocks * bits / 8)]        one packed row per n, same
                 low-bits-first order; for 8 bits one byte per block
    attributes   K, N, bits, block_size, accuracy_level

Dequantized weight: ``W[n, b*block + j] = (code - zero_point[n, b]) * scale[n, b]``; the last
block is padded when K is not a multiple of block_size (the padding is never read).

accuracy_level=4 (int8 activations) is the default: measured with onnxruntime 1.32 on 2 cores,
2-, 4- and 8-bit then run in ~60-110 us for 2048x2048 at one token, while level 0 sends 2 and
8 bits to a path ~100x slower.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from coalora.kernels.options import QuantOption
from coalora.kernels.quantize import QuantizedMatrix

DOMAIN = "com.microsoft"
DEFAULT_ACCURACY_LEVEL = 4
# Widths with an fp32-activation (accuracy_level 0) kernel in onnxruntime 1.32; the others run
# a path ~100x slower there (measured: 2048x4096 at one token, 2 threads, 1.0 ms at 4 bits
# against 99-115 ms at 2 and 8 bits), so an exact graph multiplies them dequantized instead.
FP32_KERNEL_BITS = frozenset({4})


def exact_as_fp32(bits: int, accuracy_level: int) -> bool:
    """Whether a graph at ``accuracy_level`` computes a ``bits``-wide matrix as an fp32
    MatMul of its dequantized weight (one home for the rule: graphs, plan and speed)."""
    return accuracy_level == 0 and bits not in FP32_KERNEL_BITS


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack the last axis of uint8 ``values`` (each < 2**bits) low-bits-first into bytes."""
    values = np.asarray(values, dtype=np.uint8)
    if bits == 8:
        return values.copy()
    per_byte = 8 // bits
    n = values.shape[-1]
    pad = (-n) % per_byte
    if pad:
        values = np.concatenate(
            [values, np.zeros(values.shape[:-1] + (pad,), dtype=np.uint8)], axis=-1
        )
    grouped = values.reshape(values.shape[:-1] + (-1, per_byte)).astype(np.uint16)
    shifts = np.arange(per_byte, dtype=np.uint16) * bits
    return (grouped << shifts).sum(-1).astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of ``pack_bits``: the first ``count`` values of the last axis."""
    packed = np.asarray(packed, dtype=np.uint8)
    if bits == 8:
        return packed[..., :count].copy()
    per_byte = 8 // bits
    shifts = np.arange(per_byte, dtype=np.uint8) * bits
    mask = np.uint8((1 << bits) - 1)
    out = (packed[..., None] >> shifts) & mask
    return out.reshape(packed.shape[:-1] + (-1,))[..., :count]


@dataclass
class MatMulNBitsWeights:
    """The three initializers and the attributes of one MatMulNBits node."""

    b: np.ndarray  # uint8 [N, n_blocks, blob]
    scales: np.ndarray  # float32 [N * n_blocks]
    zero_points: np.ndarray  # uint8 [N * ceil(n_blocks * bits / 8)]
    K: int
    N: int
    bits: int
    block_size: int

    @property
    def option(self) -> QuantOption:
        return QuantOption(self.bits, self.block_size)

    @property
    def n_blocks(self) -> int:
        return -(-self.K // self.block_size)

    def nbytes(self) -> int:
        return self.b.nbytes + self.scales.nbytes + self.zero_points.nbytes

    def layout(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """The dtype and shape MatMulNBits requires of each tensor, from K, N and the option."""
        nb = self.n_blocks
        return {
            "b": (np.dtype(np.uint8), (self.N, nb, self.block_size * self.bits // 8)),
            "scales": (np.dtype(np.float32), (self.N * nb,)),
            "zero_points": (np.dtype(np.uint8), (self.N * -(-nb * self.bits // 8),)),
        }

    def layout_problem(self) -> str | None:
        """``None`` when every tensor has the layout MatMulNBits runs, else what is off."""
        for part, (dtype, shape) in self.layout().items():
            arr = getattr(self, part)
            if arr.dtype != dtype or tuple(arr.shape) != shape:
                return f"{part} is {arr.dtype} {list(arr.shape)}, expected {dtype} {list(shape)}"
        if not np.isfinite(self.scales).all():
            return "scales are not finite"
        return None

    def attributes(self, accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> dict[str, int]:
        return {
            "K": self.K,
            "N": self.N,
            "bits": self.bits,
            "block_size": self.block_size,
            "accuracy_level": accuracy_level,
        }


def to_matmulnbits(qm: QuantizedMatrix) -> MatMulNBitsWeights:
    opt = qm.option
    n, nb, _ = qm.codes.shape
    return MatMulNBitsWeights(
        b=pack_bits(qm.codes, opt.bits),
        scales=np.ascontiguousarray(qm.scales, dtype=np.float32).reshape(-1),
        zero_points=pack_bits(qm.zero_points, opt.bits).reshape(-1),
        K=qm.in_features,
        N=n,
        bits=opt.bits,
        block_size=opt.block_size,
    )


def from_matmulnbits(w: MatMulNBitsWeights) -> QuantizedMatrix:
    nb = w.n_blocks
    codes = unpack_bits(w.b, w.bits, w.block_size)
    zp_row = -(-nb * w.bits // 8)
    zp = unpack_bits(w.zero_points.reshape(w.N, zp_row), w.bits, nb)
    return QuantizedMatrix(
        option=QuantOption(w.bits, w.block_size),
        in_features=w.K,
        codes=codes.reshape(w.N, nb, w.block_size),
        scales=w.scales.reshape(w.N, nb).astype(np.float32),
        zero_points=zp,
    )


def dequantize(w: MatMulNBitsWeights) -> np.ndarray:
    """Numpy reference: float32 [N, K] the kernel multiplies by."""
    return from_matmulnbits(w).dequantize()


def make_node(
    input_name: str,
    output_name: str,
    weight_prefix: str,
    w: MatMulNBitsWeights,
    *,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    node_name: str | None = None,
) -> tuple[Any, list[Any]]:
    """A MatMulNBits NodeProto and its initializers (TensorProtos), named ``weight_prefix.*``.

    Needs the ``onnx`` package (graph building); the numpy parts of this module do not.
    """
    from onnx import helper, numpy_helper

    names = [f"{weight_prefix}.qweight", f"{weight_prefix}.scales", f"{weight_prefix}.qzeros"]
    inits = [
        numpy_helper.from_array(w.b, names[0]),
        numpy_helper.from_array(w.scales, names[1]),
        numpy_helper.from_array(w.zero_points, names[2]),
    ]
    node = helper.make_node(
        "MatMulNBits",
        [input_name, *names],
        [output_name],
        name=node_name or f"{weight_prefix}.MatMulNBits",
        domain=DOMAIN,
        **w.attributes(accuracy_level),
    )
    return node, inits
