"""The Gemma 3 decoder graph against transformers on a tiny random Gemma 3.

Same method as test_graphs: the torch model gets the dequantized weights back and the same
LoRA side branch through hooks. The tiny config has a sliding window (4) shorter than the
prompt, so the sliding layers' window, both RoPE bases, the q/k norms and the (1 + w) norms
all show in the logits if one is wrong.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Gemma3ForCausalLM

from coalora.export import models
from coalora.kernels.options import QuantOption
from coalora.runtime.format.spec import EMBED_TOKENS
from coalora.runtime.graphs.gemma3 import FULL, SLIDING, Gemma3Arch
from coalora.runtime.graphs.llama import build_decoder
from tests.test_graphs import DECODE_STEPS, _max_diff, _onnx_generate, _session, _torch_generate
from tests.test_graphs import _prepare as graphs_prepare


def tiny_gemma3(seed: int = 0, **overrides):
    return models.tiny_gemma3(seed, vocab_size=128, **overrides)


def _prepare(model: Gemma3ForCausalLM, option: QuantOption, rank: int | None):
    arch, weights, lora = graphs_prepare(model, option, rank, seed=3, arch_class=Gemma3Arch)
    weights.lora = lora
    return arch, weights


def test_arch_reads_a_gemma3_config() -> None:
    arch = Gemma3Arch.from_config(tiny_gemma3().config.to_dict())
    assert arch.layer_types == (SLIDING, SLIDING, FULL)
    assert (arch.rope_theta, arch.rope_local_theta, arch.sliding_window) == (1e6, 1e4, 4)
    assert arch.query_pre_attn_scalar == 48 and arch.tie_word_embeddings
    assert len(arch.extra_tensor_names()) == 4 * 3


@pytest.mark.parametrize(
    ("option", "level", "rank", "fuse", "rel"),
    [
        # fp32 activations: only onnxruntime's arithmetic differs
        (QuantOption(4, 32), 0, 8, False, 1e-4),
        # the fast path: int8 activations per block, fused q/k/v and gate/up
        (QuantOption(4, 32), 4, 8, True, 0.03),
        (QuantOption(8, 32), 4, None, True, 0.03),
    ],
)
def test_gemma3_decoder_matches_transformers(option, level, rank, fuse, rel) -> None:
    model = tiny_gemma3()
    arch, weights = _prepare(model, option, rank)
    proto = build_decoder(
        arch,
        weights,
        lora_rank=rank,
        accuracy_level=level,
        fuse_qkv=fuse,
        fuse_gate_up=fuse,
    )
    got, got_tokens = _onnx_generate(_session(proto), arch, DECODE_STEPS)
    want, want_tokens = _torch_generate(model, DECODE_STEPS)
    diff = _max_diff(got, want)
    scale = max(float(np.abs(w).max()) for w in want)
    print(
        f"gemma3 {option} level={level} rank={rank}: max|diff|={diff:.2e} (|logits|<={scale:.2f})"
    )
    assert got_tokens == want_tokens
    assert diff < rel * scale


def test_a_wrong_window_would_show() -> None:
    """The sliding window matters on this prompt: a graph built as if every layer were global
    disagrees with torch, so the test above checks the window."""
    model = tiny_gemma3(seed=1)
    arch, weights = _prepare(model, QuantOption(8, 32), None)
    wrong = Gemma3Arch(**{**arch.__dict__, "layer_types": (FULL, FULL, FULL)})
    proto = build_decoder(wrong, weights, lora_rank=None, accuracy_level=0)
    got, _ = _onnx_generate(_session(proto), wrong, 2)
    want, _ = _torch_generate(model, 2)
    scale = max(float(np.abs(w).max()) for w in want)
    assert _max_diff(got, want) > 1e-3 * scale


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"final_logit_softcapping": 30.0}, "soft-capping"),
        ({"hidden_activation": "relu"}, "activation"),
        ({"layer_types": ["sliding_attention"]}, "layer_types"),
    ],
)
def test_unsupported_gemma3_configs_are_refused(change, message) -> None:
    cfg = {**tiny_gemma3().config.to_dict(), **change}
    with pytest.raises(ValueError, match=message):
        Gemma3Arch.from_config(cfg)


# -- a trained tiny Gemma 3 bundle, end to end ---------------------------------------------------
@pytest.fixture(scope="module")
def gemma3_bundle(tmp_path_factory: pytest.TempPathFactory):
    from bundles import build_gemma3_bundle

    return build_gemma3_bundle(tmp_path_factory.mktemp("bundles") / "tiny-gemma3")


PROMPT_IDS = [5, 9, 17, 33, 8, 12, 40, 7]  # longer than the sliding window


def _torch_logits(model, config) -> np.ndarray:
    model.set_mode("quant")
    model.set_configuration(config)
    with torch.no_grad():
        return model(input_ids=torch.tensor([PROMPT_IDS])).logits[0, -1].numpy()


def _device_logits(rt) -> np.ndarray:
    from tests.test_runtime import _first_logits

    return _first_logits(rt, PROMPT_IDS)


def test_a_gemma3_bundle_decodes_as_torch_computes(gemma3_bundle) -> None:
    from coalora.runtime.engine import Runtime

    path, model = gemma3_bundle
    exact = Runtime.open(
        path, budget="6bits", threads=1, context_length=64, lora_bits=32, accuracy_level=0
    )
    assert exact.bundle.family == "gemma3" and isinstance(exact.arch, Gemma3Arch)
    # the tied table ships once, as the quantized head's codes (spec.EMBED_TOKENS)
    base = exact._mapped.base()
    assert EMBED_TOKENS not in base and "lm_head.qweight" in base
    want = _torch_logits(model, exact.config)
    # fp32 activations: only onnxruntime's arithmetic differs (torch trains on the shipped
    # head's codes, the exact graph dequantizes the same codes)
    diff = np.abs(_device_logits(exact) - want).max()
    assert diff < 1e-4 * np.abs(want).max()
    model.set_mode("no-lora")
    with torch.no_grad():
        bare = model(input_ids=torch.tensor([PROMPT_IDS])).logits[0, -1].numpy()
    assert np.abs(bare - want).max() > 10 * diff
    fast = Runtime.open(path, budget="6bits", threads=1, context_length=64)
    got = _device_logits(fast)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    tokens = fast.generate_ids(PROMPT_IDS, 8)
    assert 1 <= len(tokens) <= 8
    assert fast.selection.plan.total > 0
    # a lower budget switches to another stored configuration and still decodes as torch
    low = Runtime.open(
        path, budget="4bits", threads=1, context_length=64, lora_bits=32, accuracy_level=0
    )
    assert low.config != exact.config
    want_low = _torch_logits(model, low.config)
    assert np.abs(_device_logits(low) - want_low).max() < 1e-4 * np.abs(want_low).max()
    for rt in (exact, fast, low):
        rt.close()
