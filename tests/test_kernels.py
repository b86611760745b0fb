"""The formats the device runs: quantizer, MatMulNBits packing, and onnxruntime parity."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coalora.kernels import DEFAULT_OPTIONS, QuantOption, quantize, quantize_rtn
from coalora.kernels.matmulnbits import (
    MatMulNBitsWeights,
    dequantize,
    from_matmulnbits,
    make_node,
    pack_bits,
    to_matmulnbits,
    unpack_bits,
)
from coalora.kernels.quantize import weighted_error


def _session(mw: MatMulNBitsWeights, accuracy_level: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node, inits = make_node("x", "y", "w", mw, accuracy_level=accuracy_level)
    graph = helper.make_graph(
        [node],
        "matmulnbits",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, mw.K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, mw.N])],
        inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("option", DEFAULT_OPTIONS, ids=str)
@pytest.mark.parametrize("in_features", [256, 200])
def test_onnxruntime_matches_numpy_reference(option: QuantOption, in_features: int) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((48, in_features)).astype(np.float32)
    mw = to_matmulnbits(quantize(w, option))
    x = rng.standard_normal((3, in_features)).astype(np.float32)
    ref = x @ dequantize(mw).T
    y = _session(mw, accuracy_level=4).run(None, {"x": x})[0]
    # accuracy_level=4 quantizes activations to int8 per block: ~1% of the output's range.
    assert np.abs(y - ref).max() <= 2e-2 * np.abs(ref).max()


@pytest.mark.parametrize("in_features", [256, 200])
def test_onnxruntime_fp32_path_is_exact_for_4bit(in_features: int) -> None:
    # With fp32 activations (accuracy_level 0) the only difference is summation order.
    rng = np.random.default_rng(1)
    w = rng.standard_normal((32, in_features)).astype(np.float32)
    mw = to_matmulnbits(quantize(w, QuantOption(4, 32)))
    x = rng.standard_normal((2, in_features)).astype(np.float32)
    y = _session(mw, accuracy_level=0).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ dequantize(mw).T, rtol=1e-4, atol=1e-4)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 4, 8]),
    rows=st.integers(1, 5),
    count=st.integers(1, 70),
    seed=st.integers(0, 2**31 - 1),
)
def test_pack_unpack_round_trip(bits: int, rows: int, count: int, seed: int) -> None:
    values = np.random.default_rng(seed).integers(0, 1 << bits, size=(rows, count), dtype=np.uint8)
    packed = pack_bits(values, bits)
    assert packed.shape == (rows, -(-count * bits // 8))
    np.testing.assert_array_equal(unpack_bits(packed, bits, count), values)


def test_packing_is_low_bits_first() -> None:
    # Element 0 sits in the low nibble, element 1 in the high nibble (onnxruntime's order).
    assert pack_bits(np.array([[1, 2]], dtype=np.uint8), 4).tolist() == [[0x21]]
    assert pack_bits(np.array([[1, 2, 3, 0]], dtype=np.uint8), 2).tolist() == [[0b00111001]]


@settings(max_examples=25, deadline=None)
@given(
    option=st.sampled_from(DEFAULT_OPTIONS),
    rows=st.integers(1, 4),
    in_features=st.integers(1, 300),
    seed=st.integers(0, 2**31 - 1),
)
def test_matmulnbits_round_trip(
    option: QuantOption, rows: int, in_features: int, seed: int
) -> None:
    w = np.random.default_rng(seed).standard_normal((rows, in_features)).astype(np.float32)
    qm = quantize(w, option)
    mw = to_matmulnbits(qm)
    back = from_matmulnbits(mw)
    np.testing.assert_array_equal(back.codes, qm.codes)
    np.testing.assert_array_equal(back.zero_points, qm.zero_points)
    np.testing.assert_array_equal(dequantize(mw), qm.dequantize())
    assert mw.nbytes() == option.nbytes(rows, in_features)


@pytest.mark.parametrize("block", [32, 64, 128])
def test_error_falls_as_bits_rise(block: int) -> None:
    w = np.random.default_rng(2).standard_normal((64, 256)).astype(np.float32)
    errors = [weighted_error(w, quantize(w, QuantOption(b, block))) for b in (2, 4, 8)]
    assert errors[0] > errors[1] > errors[2] > 0


@pytest.mark.parametrize("option", DEFAULT_OPTIONS, ids=str)
def test_search_never_worse_than_round_to_nearest(option: QuantOption) -> None:
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((64, 192)) * rng.uniform(0.1, 3.0, size=(1, 192))).astype(np.float32)
    importance = rng.uniform(0.0, 4.0, size=192).astype(np.float32)
    rtn = weighted_error(w, quantize_rtn(w, option), importance)
    searched = weighted_error(w, quantize(w, option, importance=importance), importance)
    assert searched <= rtn
    if option.bits == 2:
        assert searched < 0.8 * rtn  # the search earns its keep where rounding hurts most


def test_quantizer_handles_constant_and_padded_blocks() -> None:
    w = np.zeros((2, 40), dtype=np.float32)
    w[1, :] = 3.5
    qm = quantize(w, QuantOption(4, 32))
    np.testing.assert_allclose(qm.dequantize(), w, atol=1e-6)
    assert qm.codes.shape == (2, 2, 32)


def test_same_sign_blocks_stay_representable() -> None:
    # An integer zero point in [0, levels] needs 0 inside the range: all-positive and
    # all-negative blocks must not be clipped at one end.
    rng = np.random.default_rng(4)
    w = rng.uniform(2.0, 4.0, size=(4, 64)).astype(np.float32)
    w[2:] *= -1
    for bits in (2, 4, 8):
        rtn = quantize_rtn(w, QuantOption(bits, 32))
        step = 4.0 / ((1 << bits) - 1)
        assert np.abs(rtn.dequantize() - w).max() <= step / 2 + 1e-5
        searched = quantize(w, QuantOption(bits, 32))
        assert weighted_error(w, searched) <= weighted_error(w, rtn)


def test_quantizer_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="2-D"):
        quantize(np.zeros(5, dtype=np.float32), QuantOption(4, 32))
    with pytest.raises(ValueError, match="NaN"):
        quantize(np.full((2, 32), np.nan, dtype=np.float32), QuantOption(4, 32))
    with pytest.raises(ValueError, match="importance"):
        quantize(np.ones((2, 32), dtype=np.float32), QuantOption(4, 32), importance=-np.ones(32))
    with pytest.raises(ValueError, match="unknown quantization method"):
        quantize(np.ones((2, 32), dtype=np.float32), QuantOption(4, 32), method="nf4")  # type: ignore[arg-type]


@pytest.mark.parametrize("bits", [3, 5, 6, 16])
def test_unsupported_bits_are_refused(bits: int) -> None:
    with pytest.raises(ValueError, match="unsupported bit-width"):
        QuantOption(bits, 32)


def test_option_accounting() -> None:
    opt = QuantOption(4, 32)
    # 4 bits of code + 32 bits of fp32 scale per 32 weights + 4 bits of zero point per 32.
    assert opt.nbytes(10, 64) == 10 * (64 // 2 + 2 * 4 + 1)
    assert opt.bits_per_weight(10, 64) == pytest.approx(opt.nominal_bits())
    # A padded tail block is paid for in full.
    assert QuantOption(2, 128).nbytes(1, 576) == 5 * 32 + 5 * 4 + 2
    assert QuantOption.parse("8b128") == QuantOption(8, 128)
    assert str(QuantOption(2, 64)) == "2b64"
    with pytest.raises(ValueError, match="expected e.g."):
        QuantOption.parse("four bits")
