"""A matrix's quantization option and what it costs in RAM on the device.

An option is an asymmetric uniform block quantizer: every ``block_size`` consecutive weights
along the input dimension share one scale and one integer zero point. It is stored exactly in
onnxruntime's MatMulNBits layout, so the cost counted here is the cost the device pays:

    codes        N * n_blocks * block_size * bits / 8   (the last block is padded)
    scales       N * n_blocks * scale_bytes             (the dtype the kernel takes: fp32)
    zero points  N * ceil(n_blocks * bits / 8)          (packed like the codes)

Only bits the CPU kernel runs fast are offered (2, 4, 8; 3/5/6 are refused by onnxruntime).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

SUPPORTED_BITS: tuple[int, ...] = (2, 4, 8)
SUPPORTED_BLOCK_SIZES: tuple[int, ...] = (32, 64, 128)
# MatMulNBits takes scales in the activation dtype; the runtime runs fp32 activations.
SCALE_BYTES = 4

_OPTION_RE = re.compile(r"^\s*(\d+)\s*b(?:its?)?\s*[/x_-]?\s*(\d+)\s*$", re.IGNORECASE)


@dataclass(frozen=True, order=True)
class QuantOption:
    """``bits`` per code, ``block_size`` weights per (scale, zero point) pair."""

    bits: int
    block_size: int

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(
                f"unsupported bit-width {self.bits}: the kernel runs {list(SUPPORTED_BITS)}"
            )
        if self.block_size < 16 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block size must be a power of two >= 16, got {self.block_size}")

    @property
    def name(self) -> str:
        return f"{self.bits}b{self.block_size}"

    def __str__(self) -> str:
        return self.name

    @classmethod
    def parse(cls, text: str) -> QuantOption:
        """Parse ``"4b32"`` (also ``"4bit-32"``, ``"4b/32"``)."""
        m = _OPTION_RE.match(text)
        if not m:
            raise ValueError(f"cannot read quantization option {text!r}: expected e.g. '4b32'")
        return cls(int(m.group(1)), int(m.group(2)))

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1

    def n_blocks(self, in_features: int) -> int:
        return math.ceil(in_features / self.block_size)

    def nbytes(self, out_features: int, in_features: int, scale_bytes: int = SCALE_BYTES) -> int:
        """Bytes the device holds for an ``out_features x in_features`` matrix."""
        nb = self.n_blocks(in_features)
        codes = out_features * nb * self.block_size * self.bits // 8
        scales = out_features * nb * scale_bytes
        zero_points = out_features * math.ceil(nb * self.bits / 8)
        return codes + scales + zero_points

    def bits_per_weight(self, out_features: int, in_features: int) -> float:
        return 8.0 * self.nbytes(out_features, in_features) / (out_features * in_features)

    def nominal_bits(self) -> float:
        """Bits per weight for a matrix whose width is a multiple of the block size."""
        return self.bits + 8.0 * SCALE_BYTES / self.block_size + self.bits / self.block_size


DEFAULT_OPTIONS: tuple[QuantOption, ...] = tuple(
    QuantOption(b, g) for b in SUPPORTED_BITS for g in SUPPORTED_BLOCK_SIZES
)
