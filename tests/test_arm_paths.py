"""benchmarks/arm_paths.py's graph pieces: the numpy reference is MatMulNBits' layout, the
nibble-plane split keeps the same weights, and the path probe tells packed from unpacked."""

from __future__ import annotations

import numpy as np

from benchmarks import arm_paths as ap
from coalora.kernels.matmulnbits import MatMulNBitsWeights, dequantize


def test_reference_matches_the_kernels_layout() -> None:
    rng = np.random.default_rng(1)
    for bits, block in ((2, 32), (4, 64), (8, 128)):
        w = ap._weights(rng, 200, 24, bits, block, zp=True)
        mnb = MatMulNBitsWeights(w["b"], w["scales"], w["zp"], 200, 24, bits, block)
        np.testing.assert_allclose(ap._dequant(w, 200, 24, bits, block), dequantize(mnb))


def test_nibble_planes_are_the_same_matrix() -> None:
    rng = np.random.default_rng(2)
    for block in (32, 64, 128):
        w = ap._weights(rng, 576, 16, 8, block, zp=True)
        planes = ap._nibble_planes(w, 576, 16, block)
        total = sum(ap._dequant(pw, 576, 16, 4, block) for pw, _, _ in planes)
        np.testing.assert_allclose(total, ap._dequant(w, 576, 16, 8, block), rtol=1e-6, atol=1e-6)


def test_probe_tells_the_path_on_this_cpu() -> None:
    # Level 0 has no packed 2-bit kernel anywhere (fp32 compute exists for 4 bits only).
    res = ap.measure(
        "test", rounds=1, reps=1, level0_blocks=(32,), names=["2b32@0", "4b32@0", "4b32@4"]
    )
    v = res["variants"]
    assert v["2b32@0"]["unpacked"] and not v["4b32@0"]["unpacked"]
    assert v["4b32@0"]["compute"] == "fp32" and v["4b32@0"]["rel_error"] < 1e-5
