"""The training levers: sandwich sampling, residual LoRA init, distillation from the teacher."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch

from coalora.export.coa_lora import CoALoRAConfig, CoALoRAModel, init, train
from coalora.export.coa_lora.distill import kl_to_teacher, teacher_topk
from coalora.export.coa_lora.init import init_option
from coalora.export.coa_lora.sampling import ConfigSampler
from coalora.export.coa_lora.train import sample_configs
from coalora.export.data import Batches
from coalora.export.models import config_space, tiny_llama
from coalora.export.options import ExportError, ExportOptions
from coalora.export.phases import TrainingSets
from coalora.kernels import Configuration, QuantOption

pytestmark = pytest.mark.usefixtures("one_torch_thread")
OPTIONS = (QuantOption(2, 64), QuantOption(4, 32), QuantOption(8, 32))


def _space():
    return config_space(tiny_llama(), OPTIONS)


def _configs(space, n: int = 6) -> list[Configuration]:
    """Uniform 2/4/8-bit plus distinct random mixes: cheapest all 2-bit, dearest all 8-bit."""
    out = [space.uniform(o) for o in OPTIONS]
    rng = np.random.default_rng(0)
    while len(out) < n:
        picks = rng.integers(0, len(OPTIONS), len(space.matrices))
        picks[:2] = (0, 2)  # never a uniform one
        mix = Configuration(
            {m.name: OPTIONS[int(p)] for m, p in zip(space.matrices, picks, strict=True)}
        )
        if mix not in out:
            out.append(mix)
    return out


def _lm_batches(n: int = 32, length: int = 24) -> Batches:
    g = torch.Generator().manual_seed(0)
    start = torch.randint(4, 68, (n, 1), generator=g)
    ids = 4 + (start + torch.arange(length)) % 64
    return Batches({"input_ids": ids, "labels": ids}, batch_size=8, seed=0)


# -- sandwich sampling --------------------------------------------------------------------------
def test_sandwich_takes_both_ends_and_favours_high_loss() -> None:
    space = _space()
    configs = _configs(space)
    bits = [space.bits(c) for c in configs]
    cheapest, dearest = configs[int(np.argmin(bits))], configs[int(np.argmax(bits))]
    sampler = ConfigSampler("sandwich", 3, seed=0, space=space)
    middle = [c for c in configs if c not in (cheapest, dearest)]
    sampler.observe(middle, [10.0] + [0.1] * (len(middle) - 1))  # one hard configuration
    counts: Counter = Counter()
    for step in range(200):
        chosen = sampler.sample(configs, step)
        assert chosen[:2] == [cheapest, dearest] and len(set(chosen)) == 3
        counts[chosen[2]] += 1
    assert counts[middle[0]] > 150  # drawn ~10/10.3 of the time, not 1/4
    assert sampler.sample(configs, 7) == sampler.sample(configs, 7)  # a function of the step


def test_sandwich_with_two_per_step_alternates_the_ends() -> None:
    space = _space()
    configs = _configs(space)
    bits = [space.bits(c) for c in configs]
    sampler = ConfigSampler("sandwich", 2, seed=0, space=space)
    assert sampler.sample(configs, 0)[0] == configs[int(np.argmin(bits))]
    assert sampler.sample(configs, 1)[0] == configs[int(np.argmax(bits))]
    uniform = ConfigSampler("uniform", 2, seed=3, space=space)
    assert uniform.sample(configs, 5) == sample_configs(configs, 2, 3, 5)
    with pytest.raises(ValueError, match="sampler"):
        ConfigSampler("greedy", 2, 0, space)


def test_floor_takes_the_cheapest_every_step_and_weights_the_rest_by_loss() -> None:
    space = _space()
    configs = _configs(space)
    bits = [space.bits(c) for c in configs]
    cheapest = configs[int(np.argmin(bits))]
    sampler = ConfigSampler("floor", 2, seed=0, space=space)
    rest = [c for c in configs if c != cheapest]
    sampler.observe(rest, [10.0] + [0.1] * (len(rest) - 1))
    counts: Counter = Counter()
    for step in range(200):
        chosen = sampler.sample(configs, step)
        assert chosen[0] == cheapest and len(set(chosen)) == 2
        counts[chosen[1]] += 1
    assert counts[rest[0]] > 150  # the dearest is not forced in: the loss decides
    with pytest.raises(ValueError, match="at least 2"):
        ConfigSampler("floor", 1, seed=0, space=space)


def test_theta_lr_scale_moves_theta_alone_faster(tmp_path) -> None:
    space = _space()
    configs = _configs(space)
    moved = {}
    for scale in (1.0, 10.0):
        cfg = CoALoRAConfig(rank=4, lr=1e-3, theta_lr_scale=scale)
        model = CoALoRAModel(tiny_llama(), space, cfg, kind="causal-lm")
        before = {k: v.clone() for k, v in model.trainable_state_dict().items()}
        train(model, _lm_batches(), configs, steps=2, progress=False)
        after = model.trainable_state_dict()
        delta = {k: float((after[k] - before[k]).abs().max()) for k in before}
        moved[scale] = (
            max(v for k, v in delta.items() if k.startswith("theta.")),
            max(v for k, v in delta.items() if not k.startswith("theta.")),
        )
    # Adam's step is ~lr per weight: θ's grows with the scale, the shared LoRA's does not
    assert moved[10.0][0] > 5 * moved[1.0][0]
    assert moved[10.0][1] == pytest.approx(moved[1.0][1], rel=0.5)
    with pytest.raises(ExportError, match="theta-lr-scale"):
        ExportOptions.for_model("smollm2", "o", theta_lr_scale=0).check()
    # 1.0 was the default before: work dirs written then still match
    at_one = ExportOptions.for_model("smollm2", "o", theta_lr_scale=1.0).training_key()
    assert "theta_lr_scale" not in at_one
    assert "theta_lr_scale" in ExportOptions.for_model("smollm2", "o").training_key()


def test_sandwich_training_records_what_it_drew(tmp_path) -> None:
    base = tiny_llama()
    space = config_space(base, OPTIONS)
    cfg = CoALoRAConfig(rank=4, lr=2e-3, configs_per_step=3, sampler="sandwich")
    model = CoALoRAModel(base, space, cfg, kind="causal-lm")
    configs = _configs(space)
    res = train(model, _lm_batches(), configs, steps=4, out_dir=tmp_path, progress=False)
    sets = TrainingSets(None, configs, space)
    seen = sets.seen(4, 3, 0, history=res.history)
    drawn = {configs[i] for r in res.history for i in r["drawn"]}
    assert seen == drawn and len(seen) >= 3
    # the sampler's losses survive a checkpoint: the resumed step draws what it would have
    import json

    state = json.loads((tmp_path / "checkpoint" / "trainer.json").read_text())
    assert len(state["sampler"]) == len(drawn)


# -- LoRA from the quantization residual ---------------------------------------------------------
def _started(lora_init: str) -> tuple[CoALoRAModel, dict[str, np.ndarray]]:
    """A tiny LLaMA adapter started by ``lora_init``, with random calibration importances."""
    base = tiny_llama()
    space = config_space(base, OPTIONS)
    rng = np.random.default_rng(0)
    importance = {m.name: rng.uniform(0.5, 2.0, m.in_features) for m in space.matrices}
    cfg = CoALoRAConfig(rank=4, alpha=16.0, lora_init=lora_init)
    return CoALoRAModel(base, space, cfg, kind="causal-lm", importance=importance), importance


def test_residual_init_is_the_weighted_top_r_svd() -> None:
    model, importance = _started("residual")
    opt = init_option(model, None)
    assert opt == QuantOption(2, 64)
    name = model.adapted[0]
    layer = model.layers[name]
    w = layer.weight.detach().double().numpy()
    resid = w - layer.quantized_weight(opt).double().numpy()
    delta = layer.scaling * (layer.lora_B.double() @ layer.lora_A.double()).detach().numpy()
    d = np.sqrt(importance[name] / importance[name].mean())
    u, s, vh = np.linalg.svd(resid * d, full_matrices=False)
    best = (u[:, :4] * s[:4]) @ vh[:4] / d
    np.testing.assert_allclose(delta, best, atol=1e-4 * np.abs(best).max())
    # the adapter removes part of the weighted error at that option (and never adds any)
    before = np.sum((resid * d) ** 2)
    after = np.sum(((resid - delta) * d) ** 2)
    assert after < 0.95 * before
    with pytest.raises(ValueError, match="not one of"):
        init_option(model, "4b128")


def test_residual_theta_starts_each_option_nearer_its_own_residual() -> None:
    """θ fitted to every option's residual: at an option other than the cheapest, the start
    is nearer that option's own weighted residual than the plain residual start (which
    carries the cheapest option's correction everywhere) and than B = 0."""
    fitted, importance = _started("residual-theta")
    plain, _ = _started("residual")
    space = fitted.space
    for opt in (QuantOption(4, 32), QuantOption(8, 32)):
        errors = {"fitted": 0.0, "plain": 0.0, "zero": 0.0}
        for model, key in ((fitted, "fitted"), (plain, "plain")):
            model.set_configuration(space.uniform(opt))
            for name in model.adapted:
                layer = model.layers[name]
                w = layer.weight.detach().double()
                resid = w - layer.quantized_weight(opt).double()
                delta = layer.scaling * layer.lora_B.double() @ layer.folded_A().double()
                d = torch.as_tensor(np.sqrt(importance[name] / importance[name].mean()))
                errors[key] += float((((resid - delta.detach()) * d) ** 2).sum())
                if key == "fitted":
                    errors["zero"] += float(((resid * d) ** 2).sum())
        # far nearer than the plain start, and about B = 0's (random weights: the options'
        # residuals share little of the cheapest one's subspace)
        assert errors["fitted"] < 0.3 * errors["plain"], (opt, errors)
        assert errors["fitted"] < (1.01 if opt.bits == 4 else 1.5) * errors["zero"], (opt, errors)
    # at the cheapest option θ keeps (nearly) the plain residual start: U ~ 0
    fitted.set_configuration(space.uniform(QuantOption(2, 64)))
    u = torch.stack([fitted.layers[n].U for n in fitted.adapted]).detach()
    assert float(u.abs().mean()) < 0.1
    with pytest.raises(ValueError, match="lora_init"):
        CoALoRAConfig(lora_init="pissa")


# -- distillation ---------------------------------------------------------------------------------
def test_kl_to_teacher_is_zero_for_the_teacher_and_positive_quantized() -> None:
    base = tiny_llama()
    space = config_space(base, OPTIONS)
    model = CoALoRAModel(base, space, CoALoRAConfig(rank=4), kind="causal-lm")
    batch = _lm_batches()(0)
    vocab = base.config.vocab_size
    cache = teacher_topk(model, batch, vocab)
    assert model.mode == "quant"  # restored after the teacher pass
    model.set_configuration(space.uniform(OPTIONS[0]))
    model.set_mode("fp-no-lora")
    with torch.no_grad():
        assert float(kl_to_teacher(model(**batch).logits, cache)) == pytest.approx(0, abs=1e-5)
        model.set_mode("no-lora")
        kl2 = float(kl_to_teacher(model(**batch).logits, cache))
        model.set_mode("quant")
    assert kl2 > 1e-3
    small = teacher_topk(model, batch, 5)
    assert small.index.shape[-1] == 5
    torch.testing.assert_close(small.logp.exp().sum(-1), torch.ones(small.logp.shape[:-1]))


def test_distillation_loss_is_what_training_minimises() -> None:
    base = tiny_llama()
    space = config_space(base, OPTIONS)
    cfg = CoALoRAConfig(
        rank=4, lr=3e-3, configs_per_step=1, sampler="sandwich", distill_weight=1.0, distill_topk=8
    )
    model = CoALoRAModel(base, space, cfg, kind="causal-lm")
    configs = [space.uniform(OPTIONS[0])]
    batches = _lm_batches()
    batch = batches(0)
    cache = teacher_topk(model, batch, 8)
    model.set_configuration(configs[0])
    with torch.no_grad():
        want = float(kl_to_teacher(model(**batch).logits, cache))
    res = train(model, batches, configs, steps=6, progress=False)
    # with weight 1 the step's loss is the KL alone, and training lowers it
    assert res.history[0]["loss"] == pytest.approx(want, rel=1e-4)
    assert res.history[-1]["loss"] < res.history[0]["loss"]


def test_export_options_check_the_levers() -> None:
    ExportOptions(
        "smollm2", "o", sampler="sandwich", lora_init="residual", distill_weight=0.5
    ).check()
    for bad, match in (
        (dict(sampler="greedy"), "sampler"),
        (dict(lora_init="pissa"), "lora-init"),
        (dict(distill_weight=1.5), "distill-weight"),
    ):
        with pytest.raises(ExportError, match=match):
            ExportOptions("smollm2", "o", **bad).check()
    cfg = ExportOptions("smollm2", "o", sampler="uniform", distill_weight=0.25).adapter_config()
    assert (cfg.sampler, cfg.distill_weight, cfg.lora_init) == ("uniform", 0.25, "residual")
    # the chosen recipe is the default, and the search's bound can be lifted (0: the whole set)
    opts = ExportOptions("smollm2", "o")
    assert (opts.sampler, opts.lora_init, opts.search_rescore) == ("floor", "residual", 8)
    assert opts.theta_lr_scale == 4.0
    # the demos (--fast) keep the recipe their figures were measured with
    fast = ExportOptions.for_model("smollm2", "o", fast=True)
    assert (fast.sampler, fast.theta_lr_scale) == ("sandwich", 1.0)
    ExportOptions("smollm2", "o", search_rescore=0).check()


# -- a bounded search ----------------------------------------------------------------------------
def test_bounded_rescore_measures_a_fixed_subset_and_estimates_the_rest() -> None:
    from coalora.export.coa_lora.search import ParetoSearch

    base = tiny_llama()
    space = config_space(base, OPTIONS)
    model = CoALoRAModel(base, space, CoALoRAConfig(rank=4), kind="causal-lm")
    held_out = _lm_batches(16).head(1)
    configs = sorted(_configs(space, 8), key=space.bits)
    search = ParetoSearch(
        space, eval_batches=held_out, candidates=16, proposals_per_epoch=2, segments=2, rescore=3
    )
    measured: list[int] = []
    real = search._evaluate

    def counting(m, cs):
        measured.append(len(cs))
        return real(m, cs)

    search._evaluate = counting  # type: ignore[method-assign]
    search(0, model, configs)
    log = search.history[-1]
    assert measured[0] == 3 and log.evaluated == 3 + log.proposed
    by_config = {c: loss for c, _, loss in search.last_evaluation}
    truth = real(model, configs)
    exact = [i for i, c in enumerate(configs) if abs(by_config[c] - truth[i]) < 1e-9]
    assert {0, len(configs) - 1} <= set(exact) and len(exact) == 3  # both ends measured
    with pytest.raises(ValueError, match="rescore"):
        ParetoSearch(space, eval_batches=held_out, rescore=1)
    with pytest.raises(ExportError, match="search-rescore"):
        ExportOptions("smollm2", "o", search_rescore=1).check()
    with pytest.raises(ExportError, match="search-rescore"):
        ExportOptions("smollm2", "o", search_rescore=-3).check()


# -- the training range --------------------------------------------------------------------------
def test_train_range_sweep_bounds_the_search_by_the_served_budgets() -> None:
    base = tiny_llama()
    space = config_space(base, OPTIONS)
    held_out = _lm_batches(16).head(1)
    lo, hi = 3.0, 5.0
    opts = ExportOptions("smollm2", "o", train_range="sweep", sweep_lo=lo, sweep_hi=hi)
    opts.check()
    search = opts.pareto_search(space, held_out, None)
    assert (search.lo, search.hi) == (max(lo, space.min_bits()), min(hi, space.max_bits()))
    whole = ExportOptions("smollm2", "o", train_range="space").pareto_search(space, held_out, None)
    assert (whole.lo, whole.hi) == (space.min_bits(), space.max_bits())
    with pytest.raises(ExportError, match="train-range"):
        ExportOptions("smollm2", "o", train_range="budget").check()
    # the sweep's ends shape training only when they bound it: otherwise a cached run is reused
    key = ExportOptions("smollm2", "o", train_range="space").training_key
    assert key() == ExportOptions("smollm2", "o", train_range="space", sweep_lo=3.0).training_key()
    assert "train_range" not in key() and "sweep_lo" not in key()
    swept = ExportOptions("smollm2", "o", train_range="sweep").training_key()
    assert swept != ExportOptions("smollm2", "o", train_range="sweep", sweep_lo=3.0).training_key()


# -- θ anchored at the floor ---------------------------------------------------------------------
def test_theta_anchor_zeroes_u_at_the_floor_and_survives_save_export_and_resume(tmp_path) -> None:
    ort = pytest.importorskip("onnxruntime")
    from coalora.export.exporter import theta_to_onnx
    from coalora.runtime.format.spec import THETA_INPUTS

    space = _space()
    configs = _configs(space)
    floor = min(configs, key=space.bits)
    cfg = CoALoRAConfig(rank=4, lr=2e-3, theta_anchor="floor", theta_init_std=0.5)
    model = CoALoRAModel(tiny_llama(), space, cfg, kind="causal-lm")
    train(model, _lm_batches(), configs, steps=2, out_dir=tmp_path / "run", progress=False)
    assert model.anchor == floor
    other = max(configs, key=space.bits)
    with torch.no_grad():
        assert float(model.compute_U(floor).abs().max()) == 0.0  # the floor runs the shared LoRA
        U = model.compute_U(other)
        assert float(U.abs().max()) > 1e-3
        torch.testing.assert_close(U, model.raw_U(other) - model.raw_U(floor))
    # the device's θ graph computes the same difference
    sess = ort.InferenceSession(theta_to_onnx(model), providers=["CPUExecutionProvider"])
    for c in (floor, other):
        arrays = model.encode(c)
        got = sess.run(None, {k: arrays[k] for k in THETA_INPUTS})[0]
        with torch.no_grad():
            np.testing.assert_allclose(got, model.compute_U(c).numpy(), atol=1e-5)
    # the anchor travels with the adapter file (and so with a checkpoint), not the training set
    model.save_adapter(tmp_path / "a.safetensors")
    again = CoALoRAModel(tiny_llama(), space, cfg, kind="causal-lm")
    again.load_adapter(tmp_path / "a.safetensors")
    assert again.anchor == floor
    again.anchor_at(configs[1:])  # set once: a set the search changes later keeps it
    assert again.anchor == floor
    resumed = CoALoRAModel(tiny_llama(), space, cfg, kind="causal-lm")
    train(resumed, _lm_batches(), configs, steps=3, out_dir=tmp_path / "run", progress=False)
    assert resumed.anchor == floor
    # off by default: U is θ's own output, and old work directories keep their key
    plain = CoALoRAModel(tiny_llama(), space, CoALoRAConfig(rank=4), kind="causal-lm")
    plain.anchor_at(configs)
    assert plain.anchor is None
    assert "theta_anchor" not in ExportOptions.for_model("smollm2", "o").training_key()
    anchored = ExportOptions.for_model("smollm2", "o", theta_anchor="floor")
    assert "theta_anchor" in anchored.training_key()
    for bad, match in (
        (dict(theta_anchor="ceiling"), "theta-anchor"),
        (dict(theta_anchor="floor", lora_init="residual-theta"), "do not combine"),
    ):
        with pytest.raises(ExportError, match=match):
            ExportOptions.for_model("smollm2", "o", **bad).check()


# -- a pair of its own at the lowest bit-width ---------------------------------------------------
def test_low_bit_pair_runs_only_at_the_lowest_bits_and_starts_at_the_next_components(
    tmp_path,
) -> None:
    space = _space()
    low, mid = space.uniform(OPTIONS[0]), space.uniform(OPTIONS[1])
    # no θ: the pair's own start draws from the seeded generator θ would start from next
    cfg = CoALoRAConfig(rank=4, low_bit_rank=3, lora_init="residual", use_theta=False)
    model = CoALoRAModel(tiny_llama(), space, cfg, kind="causal-lm")
    plain = CoALoRAModel(
        tiny_llama(), space, CoALoRAConfig(rank=4, lora_init="residual", use_theta=False)
    )
    name = model.adapted[0]
    layer = model.layers[name]
    # the residual's SVD continues into the pair: at 2 bits the start is its top r + r_low
    w = layer.weight.detach().float()
    d = init.input_weights(layer)
    resid = (w - layer.quantized_weight(OPTIONS[0]).float()) * d
    u, sv, vh = torch.linalg.svd(resid, full_matrices=False)
    best = (u[:, :7] * sv[:7]) @ vh[:7]
    with torch.no_grad():
        A, B = layer.folded_pair(OPTIONS[0])
        torch.testing.assert_close(layer.scaling * (B @ A) * d, best, atol=1e-4, rtol=1e-4)
        assert tuple(layer.folded_pair(OPTIONS[1])[0].shape) == (4, w.shape[1])
    # the plain model's pair is the same top r: the low pair only adds
    torch.testing.assert_close(plain.layers[name].lora_A, layer.lora_A)
    ids = _lm_batches()(0)["input_ids"]
    model.eval()
    plain.eval()
    with torch.no_grad():
        for config, same in ((mid, True), (low, False)):
            model.set_configuration(config)
            plain.set_configuration(config)
            a, b = model(input_ids=ids).logits, plain(input_ids=ids).logits
            assert torch.allclose(a, b, atol=1e-5) == same, config
        for m in (model, plain):  # unquantized there is no error for the pair to hold
            m.set_mode("fp")
        torch.testing.assert_close(model(input_ids=ids).logits, plain(input_ids=ids).logits)
        model.set_mode("quant")
        # the plain LoRA ``adapter_for`` hands out is the one the forward runs
        x = torch.randn(5, layer.in_features)
        layer.option = OPTIONS[0]
        A, B, s = model.adapter_for(low)[name]
        assert A.shape[0] == 7 and B.shape[1] == 7
        torch.testing.assert_close(
            layer.lora_delta(x), s * (x @ torch.from_numpy(A).T) @ torch.from_numpy(B).T
        )
        assert model.adapter_for(mid)[name][0].shape[0] == 4
    # trained, saved and loaded with the rest; only configurations with a 2-bit matrix move it
    before = layer.lora_A_low.detach().clone()
    train(model, _lm_batches(), [mid], steps=2, progress=False)
    torch.testing.assert_close(layer.lora_A_low, before)
    train(model, _lm_batches(), [low, mid], steps=2, out_dir=tmp_path / "run", progress=False)
    assert not torch.equal(layer.lora_A_low, before)
    model.save_adapter(tmp_path / "a.safetensors")
    again = CoALoRAModel(tiny_llama(), space, cfg, kind="causal-lm")
    again.load_adapter(tmp_path / "a.safetensors")
    torch.testing.assert_close(again.layers[name].lora_B_low, layer.lora_B_low)
    assert f"{name}.lora_A_low" in model.lora_state_dict()
    # off by default, and old work directories keep their key
    assert "low_bit_rank" not in ExportOptions.for_model("smollm2", "o").training_key()
    assert "low_bit_rank" in ExportOptions.for_model("smollm2", "o", low_bit_rank=8).training_key()
    with pytest.raises(ExportError, match="low-bit-rank"):
        ExportOptions.for_model("smollm2", "o", low_bit_rank=-1).check()
    with pytest.raises(ValueError, match="low_bit_rank"):
        CoALoRAConfig(low_bit_rank=-2)
