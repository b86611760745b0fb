"""The GPTQ quantizer: the MatMulNBits format exactly, a lower output error, shared Hessians."""

from __future__ import annotations

import numpy as np
import pytest
from test_kernels import _session

from coalora.export.allocation import cost_table
from coalora.export.calibration import activation_second_moments
from coalora.export.models import LoadedModel, tiny_llama, tiny_tokenizer
from coalora.export.quantizers import (
    Hessian,
    hessian_error,
    output_error,
    quantize_gptq,
    quantize_matrix,
)
from coalora.export.quantizers.hessians import activation_hessians
from coalora.kernels import DEFAULT_OPTIONS, QuantOption, quantize, quantize_rtn
from coalora.kernels.matmulnbits import dequantize, from_matmulnbits, to_matmulnbits


def _correlated(k: int, seed: int, tokens: int = 1500) -> np.ndarray:
    """E[x x^T] of inputs with correlated, unevenly scaled features (as in a transformer)."""
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * 0.3 + np.eye(k)
    x = rng.standard_normal((tokens, k)) @ mix * rng.uniform(0.2, 3.0, size=k)
    return x.T @ x / tokens


@pytest.mark.parametrize("option", DEFAULT_OPTIONS, ids=str)
@pytest.mark.parametrize("in_features", [256, 200])
@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
def test_gptq_emits_what_matmulnbits_runs(
    option: QuantOption, in_features: int, act_order: bool
) -> None:
    rng = np.random.default_rng(0)
    w = rng.standard_normal((24, in_features)).astype(np.float32)
    h = _correlated(in_features, 1, tokens=400)
    qm = quantize_gptq(w, option, h, act_order=act_order)
    nb = option.n_blocks(in_features)
    assert qm.codes.shape == (24, nb, option.block_size)
    assert qm.codes.dtype == np.uint8 and qm.zero_points.dtype == np.uint8
    assert qm.codes.max() <= option.levels and qm.zero_points.max() <= option.levels
    assert np.all(np.isfinite(qm.scales)) and np.all(qm.scales > 0)
    if nb * option.block_size > in_features:  # the padded tail dequantizes to exactly 0
        tail = qm.codes.reshape(24, -1)[:, in_features:]
        np.testing.assert_array_equal(tail, np.repeat(qm.zero_points[:, -1:], tail.shape[1], 1))
    mw = to_matmulnbits(qm)
    back = from_matmulnbits(mw)
    np.testing.assert_array_equal(back.codes, qm.codes)
    np.testing.assert_array_equal(back.zero_points, qm.zero_points)
    np.testing.assert_array_equal(dequantize(mw), qm.dequantize())
    # onnxruntime's kernel multiplies by exactly that weight (fp32 activations: summation order)
    x = rng.standard_normal((3, in_features)).astype(np.float32)
    y = _session(mw, accuracy_level=0).run(None, {"x": x})[0]
    np.testing.assert_allclose(y, x @ qm.dequantize().T, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("option", DEFAULT_OPTIONS, ids=str)
@pytest.mark.parametrize("act_order", [False, True], ids=["natural", "act-order"])
def test_gptq_output_error_below_rtn_and_search(option: QuantOption, act_order: bool) -> None:
    rng = np.random.default_rng(2)
    w = rng.standard_normal((48, 192)).astype(np.float32)
    h = Hessian(_correlated(192, 3))
    rtn = hessian_error(w, quantize_rtn(w, option), h)
    searched = hessian_error(w, quantize(w, option, importance=h.diag), h)
    gptq = hessian_error(w, quantize_gptq(w, option, h, act_order=act_order), h)
    assert gptq < searched < rtn
    assert gptq < 0.8 * searched  # error feedback earns its keep on correlated inputs


def test_act_order_visits_the_costliest_columns_first() -> None:
    h = Hessian(np.diag([1.0, 5.0, 3.0, 5.0]))
    np.testing.assert_array_equal(h.act_order(), [1, 3, 2, 0])  # ties keep their order
    assert h.factor(True).shape == h.factor(False).shape == (4, 4)
    assert not np.allclose(h.factor(True), h.factor(False))


def test_gptq_on_a_diagonal_hessian_is_the_search() -> None:
    # With uncorrelated inputs no column can absorb another's error: GPTQ reduces to the
    # per-block search, code for code.
    rng = np.random.default_rng(4)
    w = rng.standard_normal((16, 96)).astype(np.float32)
    diag = rng.uniform(0.5, 2.0, size=96)
    opt = QuantOption(4, 32)
    a = quantize_gptq(w, opt, np.diag(diag))
    b = quantize(w, opt, importance=diag.astype(np.float32))
    np.testing.assert_array_equal(a.codes, b.codes)
    np.testing.assert_array_equal(a.zero_points, b.zero_points)


def test_gptq_handles_dead_inputs_and_bad_hessians() -> None:
    w = np.random.default_rng(5).standard_normal((8, 64)).astype(np.float32)
    h = _correlated(64, 6)
    h[:, 10] = h[10, :] = 0.0  # an input that is always 0
    qm = quantize_gptq(w, QuantOption(2, 32), h)
    assert np.all(np.isfinite(qm.dequantize()))
    with pytest.raises(ValueError, match="inputs"):
        quantize_gptq(w, QuantOption(4, 32), np.eye(32))
    with pytest.raises(ValueError, match="finite"):
        Hessian(np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="Hessian"):
        quantize_matrix(w, QuantOption(4, 32), "gptq")
    with pytest.raises(ValueError, match="unknown quantizer"):
        quantize_matrix(w, QuantOption(4, 32), "hqq")


def test_output_error_is_the_quadratic_form() -> None:
    rng = np.random.default_rng(7)
    d = rng.standard_normal((5, 12))
    x = rng.standard_normal((300, 12))
    h = x.T @ x / 300
    direct = float(np.mean(np.sum((x @ d.T) ** 2, axis=1)))  # E ||D x||^2
    assert output_error(d, hessian=Hessian(h)) == pytest.approx(direct, rel=1e-5)
    assert output_error(d, importance=np.diag(h)) == pytest.approx(
        float(np.sum(d**2 * np.diag(h))), rel=1e-9
    )
    # Row weights: E sum_j w_j (D x)_j^2, with or without the full Hessian.
    wr = rng.uniform(0, 3, size=5)
    weighted = float(np.mean(((x @ d.T) ** 2) @ wr))
    assert output_error(d, hessian=Hessian(h), row_weights=wr) == pytest.approx(weighted, rel=1e-5)
    assert output_error(d, importance=np.diag(h), row_weights=wr) == pytest.approx(
        float((d**2 * np.diag(h)).sum(1) @ wr), rel=1e-9
    )
    assert output_error(d, hessian=Hessian(h), row_weights=np.ones(5)) == pytest.approx(direct)
    with pytest.raises(ValueError, match="row_weights"):
        output_error(d, hessian=Hessian(h), row_weights=np.ones(4))


def test_cost_table_uses_the_quantizer_and_its_hessian() -> None:
    rng = np.random.default_rng(8)
    weights = {"a": rng.standard_normal((8, 64)).astype(np.float32)}
    hess = {"a": Hessian(_correlated(64, 9))}
    moments = {"a": hess["a"].diag}
    opts = (QuantOption(2, 32), QuantOption(4, 32))
    table = cost_table(weights, moments, opts, method="gptq", hessians=hess, progress=False)
    for j, opt in enumerate(opts):
        expect = hessian_error(weights["a"], quantize_gptq(weights["a"], opt, hess["a"]), hess["a"])
        assert table.costs[0, j] == pytest.approx(expect, rel=1e-6)
    searched = cost_table(weights, moments, opts, method="search", hessians=hess, progress=False)
    assert np.all(table.costs < searched.costs)


def test_hessians_are_shared_by_matrices_reading_one_input() -> None:
    loaded = LoadedModel(tiny_llama(), tiny_tokenizer(), "causal-lm", "tiny-llama")
    texts = ["Markets rallied on Monday.", "The striker scored twice in the second half."]
    hess = activation_hessians(loaded, texts, max_length=32, batch_size=2)
    moments = activation_second_moments(loaded, texts, max_length=32, batch_size=2)
    assert list(hess) == list(moments)
    layer = "model.layers.0"
    attn, mlp = f"{layer}.self_attn", f"{layer}.mlp"
    assert hess[f"{attn}.q_proj"] is hess[f"{attn}.k_proj"] is hess[f"{attn}.v_proj"]
    assert hess[f"{mlp}.gate_proj"] is hess[f"{mlp}.up_proj"]
    assert hess[f"{attn}.o_proj"] is not hess[f"{attn}.q_proj"]
    assert hess[f"{mlp}.down_proj"] is not hess[f"{mlp}.up_proj"]
    assert len({id(h) for h in hess.values()}) == 4 * loaded.model.config.num_hidden_layers
    for name, h in hess.items():  # E[x x^T]'s diagonal is E[x^2], padding ignored alike
        np.testing.assert_allclose(h.diag, moments[name], rtol=1e-4, atol=1e-7)
        assert np.allclose(h.matrix, h.matrix.T)


def test_adapter_model_and_cost_table_run_gptq(tmp_path) -> None:
    from coalora.export.coa_lora import CoALoRAModel
    from coalora.export.models import config_space
    from coalora.export.options import ExportError, ExportOptions
    from coalora.export.phases import cached_cost_table

    loaded = LoadedModel(tiny_llama(), tiny_tokenizer(), "causal-lm", "tiny-llama")
    texts = ["Markets rallied on Monday.", "The striker scored twice in the second half."]
    hess = activation_hessians(loaded, texts, max_length=32)
    moments = {n: h.diag for n, h in hess.items()}
    opts = (QuantOption(2, 32), QuantOption(4, 32))
    space = config_space(loaded.model, opts)
    model = CoALoRAModel(
        loaded.model, space, kind="causal-lm", importance=moments, method="gptq", hessians=hess
    )
    name = space.matrices[0].name
    layer = model.layers[name]
    w = layer.weight.detach().numpy()
    expect = quantize_gptq(w, opts[0], hess[name])
    np.testing.assert_array_equal(layer.quantize(opts[0]).codes, expect.codes)
    np.testing.assert_array_equal(layer.quantized_weight(opts[0]).numpy(), expect.dequantize())
    costs, _ = cached_cost_table(model, moments, tmp_path / "costs.json", True, False)
    assert costs.costs[0, 0] == pytest.approx(hessian_error(w, expect, hess[name]), rel=1e-5)
    # Per-output-channel weights: each row's error counts by its weight; the unweighted table
    # on file is not taken for a weighted one.
    rows = {m.name: np.linspace(0.0, 2.0, m.out_features) for m in space.matrices}
    weighted, reused = cached_cost_table(
        model, moments, tmp_path / "costs.json", False, False, row_weights=rows
    )
    assert not reused
    d = (w - expect.dequantize()).astype(np.float64)
    per_row = np.einsum("nk,nk->n", d @ hess[name].matrix, d)
    assert weighted.costs[0, 0] == pytest.approx(float(per_row @ rows[name]), rel=1e-5)
    assert weighted.costs[0, 0] != pytest.approx(costs.costs[0, 0], rel=1e-3)
    again, reused = cached_cost_table(
        model, moments, tmp_path / "costs.json", False, False, row_weights=rows
    )
    assert reused and np.array_equal(again.costs, weighted.costs)
    ExportOptions("smollm2", "out", quantizer="gptq").check()
    with pytest.raises(ExportError, match="unknown quantizer"):
        ExportOptions("smollm2", "out", quantizer="hqq").check()
    with pytest.raises(ExportError, match="unknown cost-weights"):
        ExportOptions("smollm2", "out", cost_weights="fisher").check()
