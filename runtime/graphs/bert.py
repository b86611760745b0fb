"""ONNX graph of a BERT encoder classifier (BertForSequenceClassification) with MatMulNBits
linears and LoRA side branches.

    word + position + token-type embeddings ─ LayerNormalization
    per layer:  MatMulNBits q/k/v (+bias) ─ MultiHeadAttention (com.microsoft, key padding
                mask from attention_mask) ─ MatMulNBits o ─ SkipLayerNormalization
                ─ MatMulNBits up ─ Gelu ─ MatMulNBits down ─ SkipLayerNormalization
    pooler:     hidden[:, 0] ─ Gemm + Tanh ─ classifier Gemm   (fp32, as in transformers)

The six target linears of every layer (query, key, value, attention.output.dense,
intermediate.dense, output.dense) take LoRA initializers ``lora.{hf_name}.A/.B`` laid out as
described in ``weights``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from onnx import ModelProto, TensorProto

from coalora.kernels.matmulnbits import DEFAULT_ACCURACY_LEVEL, MatMulNBitsWeights
from coalora.kernels.options import QuantOption
from coalora.runtime.format.spec import LoraRanks
from coalora.runtime.graphs._onnx import MS, GraphBuilder, lora_branch
from coalora.runtime.graphs.weights import (
    LORA_METADATA_KEY,
    Adapter,
    LoraSlot,
    lora_slots_to_metadata,
    slot_ranks,
)

ARCH_METADATA_KEY = "coalora.arch"
BERT_TARGETS = (
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "intermediate.dense",
    "output.dense",
)


@dataclass(frozen=True)
class BertArch:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    num_labels: int = 2
    hidden_act: str = "gelu"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> BertArch:
        act = str(cfg.get("hidden_act", "gelu"))
        if act != "gelu":
            raise ValueError(f"unsupported activation {act!r}: the encoder graph runs erf GELU")
        pos = cfg.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ValueError(f"unsupported position embeddings {pos!r}")
        labels = cfg.get("num_labels") or len(cfg.get("id2label") or {}) or 2
        return cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=int(cfg["num_attention_heads"]),
            intermediate_size=int(cfg["intermediate_size"]),
            max_position_embeddings=int(cfg.get("max_position_embeddings", 512)),
            type_vocab_size=int(cfg.get("type_vocab_size", 2)),
            layer_norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
            num_labels=int(labels),
            hidden_act=act,
        )

    def linear_shapes(self, prefix: str = "bert.") -> dict[str, tuple[int, int]]:
        h, i_ = self.hidden_size, self.intermediate_size
        per = {
            "attention.self.query": (h, h),
            "attention.self.key": (h, h),
            "attention.self.value": (h, h),
            "attention.output.dense": (h, h),
            "intermediate.dense": (i_, h),
            "output.dense": (h, i_),
        }
        return {
            f"{prefix}encoder.layer.{layer}.{t}": shape
            for layer in range(self.num_hidden_layers)
            for t, shape in per.items()
        }


@dataclass
class BertWeights:
    """HF-named fp32 arrays (embeddings, LayerNorms, biases, pooler, classifier) and the
    quantized target linears. ``prefix`` is "bert." for BertForSequenceClassification
    state dicts and "" for a bare BertModel plus a separately named pooler/classifier."""

    arrays: dict[str, np.ndarray]
    linears: dict[str, MatMulNBitsWeights]
    lora: dict[str, Adapter] = field(default_factory=dict)
    prefix: str = "bert."

    def f32(self, key: str) -> np.ndarray:
        if key not in self.arrays:
            raise KeyError(f"weight {key!r} missing")
        return np.ascontiguousarray(self.arrays[key], dtype=np.float32)


def build_bert_classifier(
    arch: BertArch,
    weights: BertWeights,
    *,
    lora_rank: int | LoraRanks | None,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    lora_bits: int = 32,
    external: dict[str, np.ndarray] | None = None,
    scratch: Any = None,
) -> ModelProto:
    """Inputs input_ids, attention_mask, token_type_ids [batch, seq] int64;
    output logits [batch, num_labels]. ``lora_bits``, ``external`` and ``scratch``
    as in ``build_decoder``."""
    if arch.hidden_size % arch.num_attention_heads:
        raise ValueError("hidden_size must be a multiple of num_attention_heads")
    g = GraphBuilder("coalora_bert_classifier", external=external, scratch=scratch)
    p = weights.prefix
    ranks = slot_ranks(lora_rank)
    slots: list[LoraSlot] = []
    i64, f32 = TensorProto.INT64, TensorProto.FLOAT
    eps = arch.layer_norm_eps
    ids = g.input("input_ids", i64, ["batch_size", "sequence_length"])
    mask = g.input("attention_mask", i64, ["batch_size", "sequence_length"])
    types = g.input("token_type_ids", i64, ["batch_size", "sequence_length"])

    def init(key: str) -> str:
        return g.initializer(key, weights.f32(key))

    def linear(x: str, name: str) -> str:
        w = weights.linears[name]
        y = g.matmulnbits(
            x, w, name, accuracy_level=accuracy_level, bias=weights.f32(f"{name}.bias")
        )
        if not ranks:
            return y
        rank = ranks.of([QuantOption(w.bits, w.block_size)])
        slot = LoraSlot(name, (name,), w.K, (w.N,), rank, lora_bits)
        slots.append(slot)
        return lora_branch(g, x, y, slot, weights.lora, accuracy_level=accuracy_level)

    emb = f"{p}embeddings"
    word = g.op("Gather", [init(f"{emb}.word_embeddings.weight"), ids], "/emb/word", axis=0)
    tok = g.op("Gather", [init(f"{emb}.token_type_embeddings.weight"), types], "/emb/type", axis=0)
    # Positions 0..seq-1: a slice of the table, broadcast over the batch.
    seq = g.op("Gather", [g.op("Shape", [ids], "/emb/Shape"), g.const([1])], "/emb/seq", axis=0)
    pos = g.op(
        "Slice",
        [init(f"{emb}.position_embeddings.weight"), g.const([0]), seq, g.const([0])],
        "/emb/pos",
    )
    summed = g.op("Add", [g.op("Add", [word, tok], "/emb/Add0"), pos], "/emb/Add1")
    x = g.op(
        "LayerNormalization",
        [summed, init(f"{emb}.LayerNorm.weight"), init(f"{emb}.LayerNorm.bias")],
        "/emb/LayerNorm",
        axis=-1,
        epsilon=eps,
    )
    key_mask = g.op("Cast", [mask], "/attn_mask/Cast", to=TensorProto.INT32)
    head_dim = arch.hidden_size // arch.num_attention_heads
    for i in range(arch.num_hidden_layers):
        pre = f"{p}encoder.layer.{i}"
        q, k, v = (linear(x, f"{pre}.attention.self.{n}") for n in ("query", "key", "value"))
        ctx = g.node(
            "MultiHeadAttention",
            [q, k, v, "", key_mask],
            f"/layer.{i}/attention/MultiHeadAttention",
            outputs=1,
            domain=MS,
            num_heads=arch.num_attention_heads,
            scale=1.0 / math.sqrt(head_dim),
        )[0]
        o = linear(ctx, f"{pre}.attention.output.dense")
        x = g.node(
            "SkipLayerNormalization",
            [
                o,
                x,
                init(f"{pre}.attention.output.LayerNorm.weight"),
                init(f"{pre}.attention.output.LayerNorm.bias"),
            ],
            f"/layer.{i}/attention/SkipLayerNorm",
            outputs=1,
            domain=MS,
            epsilon=eps,
        )[0]
        up = linear(x, f"{pre}.intermediate.dense")
        act = g.op("Gelu", [up], f"/layer.{i}/intermediate/Gelu", domain=MS)
        down = linear(act, f"{pre}.output.dense")
        x = g.node(
            "SkipLayerNormalization",
            [down, x, init(f"{pre}.output.LayerNorm.weight"), init(f"{pre}.output.LayerNorm.bias")],
            f"/layer.{i}/output/SkipLayerNorm",
            outputs=1,
            domain=MS,
            epsilon=eps,
        )[0]

    cls = g.op("Gather", [x, g.const(0)], "/pooler/cls", axis=1)
    pooled = g.op(
        "Gemm",
        [cls, init(f"{p}pooler.dense.weight"), init(f"{p}pooler.dense.bias")],
        "/pooler/Gemm",
        transB=1,
    )
    pooled = g.op("Tanh", [pooled], "/pooler/Tanh")
    g.node(
        "Gemm",
        [pooled, init("classifier.weight"), init("classifier.bias")],
        "/classifier/Gemm",
        outputs=["logits"],
        transB=1,
    )
    g.output("logits", f32, ["batch_size", arch.num_labels])
    meta = {
        ARCH_METADATA_KEY: json.dumps(asdict(arch)),
        "coalora.lora_rank": str(ranks.rank if ranks else 0),
        "coalora.accuracy_level": str(accuracy_level),
    }
    if ranks:
        meta[LORA_METADATA_KEY] = lora_slots_to_metadata(slots)
    return g.model(meta)
