"""Turn a trained CoA-LoRA model into a bundle (format: docs/bundle-format.md).

What ships: every (matrix, option) pair that some stored Pareto configuration uses, quantized
with exactly the quantizer and calibration importance the model was trained against (so the
device runs the codes the adapter was trained for), the other weights in fp32, the shared LoRA,
θ as ONNX, the Pareto set, the tokenizer and the chat format.
"""

from __future__ import annotations

import contextlib
import io
import json
import tempfile
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from coalora.export.chat import chat_format_from_tokenizer
from coalora.export.coa_lora.model import CoALoRAModel
from coalora.kernels import ConfigSpace, MatrixSpec, QuantOption, quantize
from coalora.kernels.matmulnbits import MatMulNBitsWeights, dequantize, to_matmulnbits
from coalora.runtime.format.pareto import ParetoSet
from coalora.runtime.format.spec import (
    EMBED_TOKENS,
    LM_HEAD,
    QWEIGHT,
    QZEROS,
    SCALES,
    TASK_CAUSAL_LM,
    TASK_CLASSIFY,
    THETA_INPUTS,
    THETA_OUTPUT,
    TOKENIZER_FILE,
    Arch,
    family_of_model_type,
    tensor_name,
)
from coalora.runtime.format.writer import BundleContents, write_bundle

DEFAULT_LM_HEAD = QuantOption(8, 32)


class _ThetaForExport(nn.Module):
    """θ with a fixed five-input signature; a Shared-LoRA model (no θ) exports U = 0."""

    def __init__(self, model: CoALoRAModel):
        super().__init__()
        self.theta = model.theta
        self.rank = model.cfg.rank
        self.use_global = bool(self.theta is not None and self.theta.use_global_feature)
        # U(c) = θ(c) - θ(anchor): the anchor's term is a constant of the graph (the device
        # always asks for every matrix of the space, in its order)
        anchor = None
        if self.theta is not None and model.anchor is not None:
            with torch.no_grad():
                anchor = model.raw_U(model.anchor).detach().float()
        self.register_buffer("anchor_U", anchor)

    def forward(self, bits, block, layer, module, global_feature):  # type: ignore[no-untyped-def]
        if self.theta is None:
            return (
                torch.zeros_like(bits, dtype=torch.float32)[:, None, None].expand(
                    -1, self.rank, self.rank
                )
                * global_feature.sum()
            )
        U = self.theta(bits, block, layer, module, global_feature if self.use_global else None)
        return U if self.anchor_U is None else U - self.anchor_U


def theta_to_onnx(model: CoALoRAModel) -> bytes:
    """θ as an ONNX graph: index arrays (+ global feature) -> U [n, r, r], batched over n."""
    config = model.space.cheapest()
    arrays = model.vocab.encode(config, model.space)
    inputs = tuple(torch.as_tensor(arrays[k]) for k in THETA_INPUTS)
    wrapper = _ThetaForExport(model).eval()
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The TorchScript exporter is the one that keeps θ's graph to plain, portable ops.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            wrapper,
            inputs,
            buf,
            input_names=list(THETA_INPUTS),
            output_names=[THETA_OUTPUT],
            dynamic_axes={k: {0: "n"} for k in THETA_INPUTS[:4]} | {THETA_OUTPUT: {0: "n"}},
            dynamo=False,
        )
    return buf.getvalue()


def _architecture(model: CoALoRAModel, loaded: Any, lm_head: QuantOption | None) -> dict:
    hf_config = model.base.config
    cfg = json.loads(hf_config.to_json_string(use_diff=False))
    # Where the exporter found the model says nothing to a device and leaks the workstation's
    # paths into every bundle.
    cfg.pop("_name_or_path", None)
    family = family_of_model_type(cfg.get("model_type", "")).name
    tok = loaded.tokenizer
    eos: list[int] = []
    gen = getattr(model.base, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None), getattr(tok, "eos_token_id", None)):
        for v in value if isinstance(value, list) else [value]:
            if isinstance(v, int) and v not in eos:
                eos.append(v)
    labels = None
    if model.kind == "encoder":
        id2label = getattr(hf_config, "id2label", {}) or {}
        labels = [str(id2label.get(i, f"LABEL_{i}")) for i in range(hf_config.num_labels)]
    chat = chat_format_from_tokenizer(tok) if model.kind == "causal-lm" else None
    return {
        Arch.FAMILY: family,
        Arch.TASK: TASK_CAUSAL_LM if model.kind == "causal-lm" else TASK_CLASSIFY,
        Arch.CONFIG: cfg,
        Arch.LABELS: labels,
        Arch.CHAT_FORMAT: None if chat is None else chat.to_dict(),
        Arch.EOS_TOKEN_IDS: eos,
        Arch.BOS_TOKEN_ID: getattr(tok, "bos_token_id", None),
        Arch.LM_HEAD: None if (lm_head is None or model.kind != "causal-lm") else lm_head.name,
    }


HEAD_CODES_ATTR = "_coalora_head_codes"


def train_on_the_shipped_head(model: nn.Module, option: QuantOption | None) -> None:
    """A tied causal LM whose head ships quantized: put the head's dequantized codes in the
    table now, so training, the stored metrics and the parity check see the table and head
    the device runs (its exact graph dequantizes those codes: ``spec.EMBED_TOKENS``). The
    codes are kept on the model and written as they are (quantized once)."""
    if option is None or not getattr(model.config, "tie_word_embeddings", False):
        return
    emb = model.get_input_embeddings()
    q = to_matmulnbits(quantize(emb.weight.detach().float().cpu().numpy(), option))
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(dequantize(q)).to(emb.weight.dtype))
    setattr(model, HEAD_CODES_ATTR, (option, q))


def head_codes(model: nn.Module, option: QuantOption) -> MatMulNBitsWeights:
    """The LM head's codes at ``option``: the shipped head's own where it is that option,
    else the head quantized as trained (for a tied head, the shipped head's codes
    dequantized: the 8-bit default's error is a sixteenth of a 4-bit step)."""
    kept = getattr(model, HEAD_CODES_ATTR, None)
    if kept is not None and kept[0] == option:
        return kept[1]
    head = model.get_output_embeddings().weight.detach().float().cpu().numpy()
    return to_matmulnbits(quantize(head, option))


@contextlib.contextmanager
def serving_head(model: nn.Module, option: QuantOption) -> Iterator[MatMulNBitsWeights]:
    """Within the block the tied table and head are what a device serving the head at
    ``option`` runs (both read its codes); the table as trained comes back after it."""
    emb = model.get_input_embeddings()
    saved = emb.weight.detach().clone()
    q = head_codes(model, option)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(dequantize(q)).to(emb.weight.dtype))
    try:
        yield q
    finally:
        with torch.no_grad():
            emb.weight.copy_(saved)


def head_space(model: CoALoRAModel, options: Sequence[QuantOption]) -> ConfigSpace:
    """``model``'s configuration space with its tied head as a configured matrix."""
    cfg = model.base.config
    head = MatrixSpec(LM_HEAD, int(cfg.vocab_size), int(cfg.hidden_size))
    return ConfigSpace(model.space.matrices, model.space.options, head, options)


def _base_tensors(model: CoALoRAModel, lm_head: QuantOption | None) -> dict[str, np.ndarray]:
    """Every tensor of the base model that is not a quantized matrix (HF names, fp32)."""
    skip = {f"{n}.weight" for n in model.layers}
    tied = bool(getattr(model.base.config, "tie_word_embeddings", False))
    out: dict[str, np.ndarray] = {}
    for key, value in model.base.state_dict().items():
        if key in skip or key.rpartition(".")[2].startswith("lora_"):
            continue
        if key == tensor_name(LM_HEAD, "weight") and (tied or lm_head is not None):
            continue
        if key == EMBED_TOKENS and tied and lm_head is not None and model.kind == "causal-lm":
            continue  # the quantized head's codes are the table (spec.EMBED_TOKENS)
        out[key] = value.detach().float().cpu().numpy()
    if model.kind == "causal-lm" and lm_head is not None:
        q = head_codes(model.base, lm_head)
        out[tensor_name(LM_HEAD, QWEIGHT)] = q.b
        out[tensor_name(LM_HEAD, SCALES)] = q.scales
        out[tensor_name(LM_HEAD, QZEROS)] = q.zero_points
    return out


def _shipped(
    model: CoALoRAModel, pareto: ParetoSet
) -> dict[QuantOption, dict[str, MatMulNBitsWeights]]:
    """Quantize each (matrix, option) pair some stored configuration uses, once."""
    pairs: dict[QuantOption, set[str]] = {}
    for entry in pareto.entries:
        for name, opt in entry.config.items():
            pairs.setdefault(opt, set()).add(name)
    out: dict[QuantOption, dict[str, MatMulNBitsWeights]] = {}
    for opt in sorted(pairs):
        out[opt] = {}
        for name in sorted(pairs[opt]):
            out[opt][name] = to_matmulnbits(model.layers[name].quantize(opt))
    return out


def _tokenizer_json(tokenizer: Any, tmp: Path) -> Path | None:
    backend = getattr(tokenizer, "backend_tokenizer", None) or getattr(
        tokenizer, "_tokenizer", None
    )
    if backend is None or not hasattr(backend, "to_str"):
        return None
    path = tmp / TOKENIZER_FILE
    path.write_text(backend.to_str(), encoding="utf-8")
    return path


def export_bundle(
    model: CoALoRAModel,
    loaded: Any,
    pareto: ParetoSet,
    out_dir: str | Path,
    *,
    lm_head: QuantOption | None = DEFAULT_LM_HEAD,
    overwrite: bool = False,
    extra: Mapping[str, Any] | None = None,
    sign_key: str | Path | None = None,
) -> Path:
    """Write ``model``'s bundle to ``out_dir``; nothing is left behind if anything fails."""
    if not pareto.entries:
        raise ValueError("the Pareto set is empty: nothing to ship")
    # a configured head: the options the stored configurations name, the default among them
    named = {e.config.head for e in pareto.entries} - {None}
    space = model.space
    heads: dict[QuantOption, MatMulNBitsWeights] = {}
    if named:
        if lm_head is None or model.kind != "causal-lm":
            raise ValueError("configurations name an LM head, but the bundle ships none")
        space = head_space(model, sorted(named | {lm_head}))
        heads = {o: head_codes(model.base, o) for o in space.head_options if o != lm_head}
    for entry in pareto.entries:
        space.validate(entry.config)
    # Every quantized matrix ships an A/B pair (and its low-bit pair where the model has one);
    # a matrix left out of training keeps B = 0.
    pairs = {
        n: {k: p.detach().float().cpu().numpy() for k, p in la.lora_pairs().items()}
        for n, la in model.layers.items()
    }
    low_rank = model.cfg.low_bit_rank
    with tempfile.TemporaryDirectory() as tmp:
        contents = BundleContents(
            architecture=_architecture(model, loaded, lm_head),
            space=space,
            quantized=_shipped(model, pareto),
            base=_base_tensors(model, lm_head),
            lora_a={n: p["lora_A"] for n, p in pairs.items()},
            lora_b={n: p["lora_B"] for n, p in pairs.items()},
            lora_rank=model.cfg.rank,
            lora_alpha=float(model.cfg.alpha),
            lora_low_rank=low_rank,
            lora_low_bits=model.low_bits if low_rank else None,
            lora_a_low={n: p["lora_A_low"] for n, p in pairs.items() if low_rank},
            lora_b_low={n: p["lora_B_low"] for n, p in pairs.items() if low_rank},
            theta_onnx=theta_to_onnx(model),
            theta_vocab=model.vocab.to_dict(),
            pareto=pareto.to_dict(),
            tokenizer_json=_tokenizer_json(loaded.tokenizer, Path(tmp)),
            theta_inputs=THETA_INPUTS,
            extra=dict(extra or {}),
            heads=heads,
        )
        return write_bundle(out_dir, contents, overwrite=overwrite, sign_key=sign_key)
