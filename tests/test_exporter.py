"""A trained model exported as a bundle: what ships, and that the device reads it back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coalora.runtime.adapter import ThetaRunner
from coalora.runtime.chat import ChatFormat
from coalora.runtime.format.pareto import ParetoSet
from coalora.runtime.format.reader import Bundle
from coalora.runtime.format.theta import ThetaVocab


def test_llama_bundle_round_trip(tiny_llama_bundle: Path) -> None:
    b = Bundle.open(tiny_llama_bundle, verify="all")
    arch = b.architecture
    assert arch["family"] == "llama" and arch["task"] == "causal-lm"
    assert arch["lm_head"] == "8b32" and arch["eos_token_ids"]
    fmt = ChatFormat.from_dict(arch["chat_format"])
    assert fmt is not None and fmt.render("hi").endswith("<|im_start|>assistant\n")
    base = b.base_tensors()
    # tied with a quantized head: the table ships once, as the head's codes (spec.EMBED_TOKENS)
    assert "model.embed_tokens.weight" not in base and "lm_head.qweight" in base
    assert not any(k.endswith(("q_proj.weight", ".lora_A", ".lora_B")) for k in base)
    pareto = ParetoSet.from_dict(b.pareto_dict(), b.space)
    assert len(pareto.entries) == 4
    for entry in pareto.entries:
        b.quantized(entry.config)  # every stored configuration is fully shipped
    assert b.tokenizer_path() is not None


def test_bert_bundle_has_labels_and_no_head(tiny_bert_bundle: Path) -> None:
    b = Bundle.open(tiny_bert_bundle, verify="all")
    assert b.labels == ["sport", "business", "tech"]
    assert b.lm_head is None and b.task == "classify"
    assert "classifier.weight" in b.base_tensors()


@pytest.mark.parametrize("fixture", ["tiny_llama_bundle", "tiny_bert_bundle"])
def test_theta_onnx_matches_torch(fixture: str, request: pytest.FixtureRequest) -> None:
    """θ through onnxruntime equals θ in torch, to 1e-5, for every stored configuration."""
    import torch

    from coalora.export.coa_lora.theta import ConfigTheta

    b = Bundle.open(request.getfixturevalue(fixture))
    vocab = ThetaVocab.from_dict(b.theta_vocab)
    runner = ThetaRunner(str(b.theta_path()), b.theta_inputs)
    pareto = ParetoSet.from_dict(b.pareto_dict(), b.space)
    arrays = [vocab.encode(e.config, b.space) for e in pareto.entries]
    us = [runner(a) for a in arrays]
    assert us[0].shape == (len(b.space.matrices), b.lora_rank, b.lora_rank)
    # θ was trained: different configurations get different adjustments.
    assert not np.allclose(us[0], us[1])
    # Rebuild θ from the ONNX initializers' source: compare against the exported graph's torch twin.
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(b.theta_path()))
    weights = {
        i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in model.graph.initializer
    }
    theta = ConfigTheta(vocab, b.lora_rank)
    state = {k.removeprefix("theta."): v for k, v in weights.items() if k.startswith("theta.")}
    missing = theta.load_state_dict(state, strict=False).missing_keys
    assert not missing, missing
    with torch.no_grad():
        for a, u in zip(arrays, us, strict=True):
            np.testing.assert_allclose(theta.forward_arrays(a).numpy(), u, atol=1e-5)
