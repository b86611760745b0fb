"""QuantLoRALinear, CoALoRAModel and the training loop on tiny random models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from coalora.export.coa_lora import (
    CoALoRAConfig,
    CoALoRAModel,
    QuantLoRALinear,
    evaluate,
    evaluate_configs,
    train,
)
from coalora.export.coa_lora.train import get_lr, load_checkpoint, sample_configs
from coalora.export.data import Batches
from coalora.export.models import config_space, tiny_bert, tiny_llama
from coalora.kernels import Configuration, QuantOption, quantize

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_configs(space, n: int, seed: int = 0) -> list[Configuration]:
    rng = np.random.default_rng(seed)
    return [
        Configuration(
            {m.name: space.options[rng.integers(len(space.options))] for m in space.matrices}
        )
        for _ in range(n)
    ]


def _lm_batches(n: int = 64, length: int = 32, seed: int = 0) -> Batches:
    # A learnable pattern: each sequence counts up from a random start (mod 64).
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(4, 68, (n, 1), generator=g)
    ids = 4 + (start + torch.arange(length)) % 64
    return Batches({"input_ids": ids, "labels": ids}, batch_size=8, seed=seed)


def _cls_batches(n: int = 96, length: int = 16, seed: int = 0) -> Batches:
    # The label is the class of the first real token.
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, 300, (n, length), generator=g)
    labels = ids[:, 1] % 3
    mask = torch.ones_like(ids)
    return Batches(
        {"input_ids": ids, "attention_mask": mask, "labels": labels}, batch_size=16, seed=seed
    )


def _llama_model(**cfg) -> CoALoRAModel:
    base = tiny_llama()
    cfg.setdefault("rank", 4)
    return CoALoRAModel(base, config_space(base), CoALoRAConfig(**cfg), kind="causal-lm")


# -- QuantLoRALinear ---------------------------------------------------------------------------
def _layer(seed: int = 0) -> tuple[QuantLoRALinear, nn.Linear]:
    torch.manual_seed(seed)
    lin = nn.Linear(96, 40)
    return QuantLoRALinear(lin, rank=4, alpha=8.0), lin


def test_layer_at_init_equals_fake_quant_base():
    layer, lin = _layer()
    opt = QuantOption(4, 32)
    layer.option = opt
    x = torch.randn(3, 5, 96)
    wq = quantize(lin.weight.detach().numpy(), opt).dequantize()
    want = F.linear(x, torch.from_numpy(wq), lin.bias)
    torch.testing.assert_close(layer(x), want)
    assert opt in layer.cached_options


def test_layer_forward_matches_formula():
    layer, lin = _layer(1)
    opt = QuantOption(2, 64)
    layer.option = opt
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.U = 0.1 * torch.randn(4, 4)
    x = torch.randn(7, 96)
    wq = layer.quantized_weight(opt)
    A, B, U, s = layer.lora_A, layer.lora_B, layer.U, layer.scaling
    delta_w = s * B @ (torch.eye(4) + U) @ A
    want = x @ wq.T + lin.bias + x @ delta_w.T
    torch.testing.assert_close(layer(x), want, rtol=1e-4, atol=1e-4)


def test_layer_modes():
    layer, lin = _layer(2)
    layer.option = QuantOption(2, 32)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(4, 96)
    layer.mode = "fp-no-lora"
    torch.testing.assert_close(layer(x), lin(x))
    layer.mode = "fp"
    torch.testing.assert_close(layer(x), lin(x) + layer.lora_delta(x))
    layer.mode = "no-lora"
    wq = layer.quantized_weight(QuantOption(2, 32))
    torch.testing.assert_close(layer(x), F.linear(x, wq, lin.bias))


def test_layer_without_option_refuses():
    layer, _ = _layer()
    with pytest.raises(RuntimeError, match="set_configuration"):
        layer(torch.randn(1, 96))


# -- CoALoRAModel ------------------------------------------------------------------------------
def test_model_swaps_layers_and_freezes_base():
    model = _llama_model()
    assert len(model.layers) == 14
    names = set(model.trainable_parameters())
    assert all(".lora_" in n or n.startswith("theta.") for n in names)
    assert "theta.fc2.weight" in names
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert any(n.endswith("q_proj.weight") for n in frozen)


def test_set_configuration_keeps_theta_graph():
    model = _llama_model()
    config = _random_configs(model.space, 1)[0]
    model.set_configuration(config)
    layer = model.layers["model.layers.0.self_attn.q_proj"]
    assert layer.option == config["model.layers.0.self_attn.q_proj"]
    assert layer.U is not None and layer.U.requires_grad
    assert float(layer.U.detach().abs().max()) < 0.05
    with pytest.raises(ValueError, match="missing matrix"):
        model.set_configuration({})


def test_adapter_for_folds_U_into_A():
    model = _llama_model()
    with torch.no_grad():
        for layer in model.layers.values():
            layer.lora_B.normal_()
        model.theta.fc2.weight.normal_(std=0.3)  # a clearly non-zero U
    config = _random_configs(model.space, 1, seed=5)[0]
    adapter = model.adapter_for(config)
    assert set(adapter) == set(model.layers)
    model.set_configuration(config)
    x = torch.randn(6, 96)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        layer = model.layers[name]
        A_fold, B, s = adapter[name]
        if A_fold.shape[1] != 96:
            x = torch.randn(6, A_fold.shape[1])
        folded = s * (x.numpy() @ A_fold.T) @ B.T
        with torch.no_grad():
            unfolded = layer.lora_delta(x).numpy()
        assert float(np.abs(layer.U.detach().numpy()).max()) > 0.01
        np.testing.assert_allclose(folded, unfolded, rtol=1e-4, atol=1e-5)


def test_shared_lora_variant_has_no_theta():
    model = _llama_model(use_theta=False)
    assert model.theta is None
    assert not any(n.startswith("theta.") for n in model.trainable_parameters())
    config = _random_configs(model.space, 1)[0]
    model.set_configuration(config)
    assert all(layer.U is None for layer in model.layers.values())
    name = "model.layers.0.self_attn.k_proj"
    np.testing.assert_array_equal(
        model.adapter_for(config)[name][0], model.layers[name].lora_A.detach().numpy()
    )


def test_target_modules_limit_lora():
    model = _llama_model(target_modules=("q", "v"))
    assert len(model.adapted) == 4
    assert set(model.lora_state_dict()) == {
        f"{n}.{p}" for n in model.adapted for p in ["lora_A", "lora_B"]
    }
    assert model.layers["model.layers.0.mlp.up_proj"].mode == "no-lora"


def test_adapter_save_load_round_trip(tmp_path):
    a = _llama_model(seed=1)
    with torch.no_grad():
        for p in a.trainable_parameters().values():
            p.add_(torch.randn_like(p))
    a.save_adapter(tmp_path / "adapter.safetensors")
    b = _llama_model(seed=2)
    b.load_adapter(tmp_path / "adapter.safetensors")
    for (na, pa), (nb, pb) in zip(
        a.trainable_state_dict().items(), b.trainable_state_dict().items(), strict=True
    ):
        assert na == nb
        torch.testing.assert_close(pa, pb)


# -- training ----------------------------------------------------------------------------------
def test_lr_schedule_and_sampling():
    assert get_lr(0, 1.0, 100, 10, 0.1) == pytest.approx(0.1)
    assert get_lr(10, 1.0, 100, 10, 0.1) == pytest.approx(1.0)
    assert get_lr(100, 1.0, 100, 10, 0.1) == pytest.approx(0.1)
    configs = list(range(10))
    assert sample_configs(configs, 3, 0, 5) == sample_configs(configs, 3, 0, 5)
    assert len(set(sample_configs(configs, 3, 0, 5))) == 3
    # a set smaller than k: each configuration once, never a repeat
    assert sample_configs(configs[:1], 3, 0, 5) == configs[:1]
    assert sorted(map(str, sample_configs(configs[:2], 3, 0, 5))) == sorted(map(str, configs[:2]))


def test_training_tiny_llama_lowers_loss(tmp_path):
    model = _llama_model(lr=3e-3, configs_per_step=3)
    configs = _random_configs(model.space, 6)
    data = _lm_batches()
    held_out = _lm_batches(n=16, seed=1).head(2)
    before = evaluate(model, configs[0], held_out)
    result = train(model, data, configs, steps=30, out_dir=tmp_path, progress=False)
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-5:]) < 0.9 * np.mean(losses[:5])
    after = evaluate(model, configs[0], held_out)
    assert after < before
    log = [json.loads(line) for line in (tmp_path / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(1, 31))
    assert len(log[0]["losses"]) == 3 and {"bits", "loss"} <= set(log[0]["losses"][0])
    ppl = evaluate_configs(model, configs[:2], held_out)
    assert len(ppl) == 2 and all(p > 1 for p in ppl)


def test_training_tiny_bert_classifier():
    base = tiny_bert(num_labels=3)
    model = CoALoRAModel(base, config_space(base), CoALoRAConfig(rank=4, lr=3e-3), kind="encoder")
    assert any(n.startswith("base.classifier") for n in model.trainable_parameters())
    configs = _random_configs(model.space, 4)
    data = _cls_batches()
    result = train(model, data, configs, steps=30, progress=False)
    losses = [h["loss"] for h in result.history]
    assert np.mean(losses[-5:]) < np.mean(losses[:5])
    acc = evaluate(model, configs[0], _cls_batches(n=48, seed=1))
    assert 0.0 <= acc <= 1.0
    assert "head.classifier.weight" in model.trainable_state_dict()


def test_epoch_callback_replaces_config_set():
    model = _llama_model()
    first = _random_configs(model.space, 3, seed=1)
    second = [model.space.uniform(QuantOption(8, 32))]
    seen: list[tuple[int, int]] = []

    def on_epoch_end(epoch, m, current):
        seen.append((epoch, len(current)))
        return second

    result = train(
        model,
        _lm_batches(),
        first,
        steps=6,
        steps_per_epoch=2,
        on_epoch_end=on_epoch_end,
        progress=False,
    )
    # between the three epochs only: a set returned after the last step would never train
    assert seen == [(0, 3), (1, 1)]
    assert result.configs == second
    assert result.history[-1]["losses"][0]["bits"] == pytest.approx(
        model.space.bits(second[0]), abs=1e-3
    )


def test_checkpoint_resume_gives_identical_next_step(tmp_path):
    data = _lm_batches()
    configs = _random_configs(config_space(tiny_llama()), 4)
    kw = dict(lr=3e-3, configs_per_step=2)

    full = train(_llama_model(**kw), data, configs, steps=4, progress=False)

    out = tmp_path / "run"
    # An interrupted run: stops after step 2 of 4, leaving a checkpoint.
    train(_llama_model(**kw), data, configs, steps=4, stop_after=2, out_dir=out, progress=False)
    assert (out / "checkpoint" / "optimizer.safetensors").exists()
    state = json.loads((out / "checkpoint" / "trainer.json").read_text())
    assert state["step"] == 2
    resumed = train(_llama_model(**kw), data, configs, steps=4, out_dir=out, progress=False)
    assert [h["step"] for h in resumed.history] == [3, 4]
    assert [h["losses"] for h in resumed.history] == [h["losses"] for h in full.history[2:]]
    log = (out / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in log] == [1, 2, 3, 4]
    # The checkpoint is loadable on its own, and refuses a model with other trainables.
    assert load_checkpoint(out / "checkpoint", _llama_model(**kw))["step"] == 4
    with pytest.raises(ValueError, match="different set of trainables"):
        load_checkpoint(out / "checkpoint", _llama_model(use_theta=False))


def test_config_dict_round_trip():
    cfg = CoALoRAConfig(rank=8, alpha=16, use_global_feature=False, target_modules=("q", "v"))
    assert CoALoRAConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.scaling == 2.0
    with pytest.raises(ValueError, match="unknown CoALoRAConfig field"):
        CoALoRAConfig.from_dict({"rnak": 4})
    with pytest.raises(ValueError, match="rank"):
        CoALoRAConfig(rank=0)
