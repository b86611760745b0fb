"""ONNX graph of a LLaMA-family decoder with MatMulNBits linears, LoRA side branches and a KV cache.

The structure mirrors onnxruntime-genai's model builder for CPU int4 models, which is known to
run fast with onnxruntime's CPU kernels:

    input_ids ─ Gather(embed) ─ SimplifiedLayerNormalization
    per layer:  MatMulNBits q/k/v (fused when their options match) ─ GroupQueryAttention
                (do_rotary=1 with cos/sin caches, past/present KV in BNSH) ─ MatMulNBits o
                ─ SkipSimplifiedLayerNormalization ─ MatMulNBits gate/up ─ SiLU*up
                ─ MatMulNBits down ─ SkipSimplifiedLayerNormalization (next layer's norm)
    lm head:    fp32 Gemm on the (tied) embedding, or MatMulNBits when quantized

``seqlens_k`` and ``total_sequence_length`` for GroupQueryAttention are derived in-graph from
``attention_mask`` ([batch, past + current]), as the model builder does. One graph serves the
prefill (seq > 1, empty past) and single-token decode.

Every target linear ``y = W x`` may get ``+ s (x A'^T) B^T``: the A'/B initializers are named
``lora.{key}.A`` / ``lora.{key}.B`` (see ``weights`` for the layout) so a session can swap
adapters with ``SessionOptions.add_initializer`` without rebuilding the graph.

What benchmarks/decode_speed_graph.py measured on SmolLM2-135M shapes (2 cores): fusing q/k/v
and gate/up is a few percent faster (fewer kernel launches, one activation quantization); the
tied fp32 LM head costs about as much as all 30 layers together, so a MatMulNBits head (8b32
is as fast as 4b32) is the largest single speed-up; an 8-bit LoRA side branch costs less than
an fp32 one. For decoding, bind one [batch, kv_heads, max_len, head_dim] buffer per cache as
both past input and present output (IO binding): GroupQueryAttention then appends in place.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from onnx import ModelProto, TensorProto

from coalora.kernels.matmulnbits import DEFAULT_ACCURACY_LEVEL, MatMulNBitsWeights, to_matmulnbits
from coalora.kernels.options import QuantOption
from coalora.kernels.quantize import quantize
from coalora.runtime import plan as memory_plan
from coalora.runtime.format.spec import LoraRanks
from coalora.runtime.graphs._onnx import MS, GraphBuilder, concat_matmulnbits, lora_branch
from coalora.runtime.graphs.weights import (
    LORA_METADATA_KEY,
    DecoderWeights,
    LoraSlot,
    llama_linear_name,
    lora_slots_to_metadata,
    slot_ranks,
)

ARCH_METADATA_KEY = "coalora.arch"
# A tied head's rows, fed per run (``embedding_from_head``): codes, scales and packed zero
# points of the run's tokens only, in GatherBlockQuantized's layout (``embedding_rows``);
# ``input_ids`` then index these rows, not the vocabulary.
EMBED_ROWS = ("embed_rows.qweight", "embed_rows.scales", "embed_rows.qzeros")


def embedding_rows(
    w: MatMulNBitsWeights, vocab: int, hidden: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A MatMulNBits matrix's arrays as GatherBlockQuantized reads a table: codes
    [V, H * bits / 8] (the padding of a last partial block dropped), scales [V, n_blocks],
    packed zero points [V, bytes]. Views, not copies: of a mapped file, they say which bytes
    of it each row is."""
    if hidden * w.bits % 8:
        raise ValueError(f"hidden size {hidden} cannot hold whole bytes of {w.bits}-bit codes")
    data = w.b.reshape(vocab, -1)[:, : hidden * w.bits // 8]
    return data, w.scales.reshape(vocab, w.n_blocks), w.zero_points.reshape(vocab, -1)


def rope_settings(
    params: Mapping[str, Any], default_theta: float
) -> tuple[float, str, tuple[tuple[str, float], ...]]:
    """(theta, RoPE type, its other numeric parameters) of one HF RoPE dict."""
    rope = dict(params)
    theta = float(rope.pop("rope_theta", default_theta))
    rope_type = str(rope.pop("rope_type", rope.pop("type", "default")))
    extra = tuple(sorted((k, float(v)) for k, v in rope.items() if isinstance(v, (int, float))))
    return theta, rope_type, extra


def default_inv_freq(theta: float, head_dim: int) -> np.ndarray:
    """Unscaled RoPE inverse frequencies [head_dim / 2]."""
    return 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))


def cos_sin_cache(inv_freq: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin [max_len, head_dim / 2] of positions 0 .. max_len - 1."""
    freqs = np.outer(np.arange(max_len, dtype=np.float64), inv_freq)
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


@dataclass(frozen=True)
class LlamaArch:
    """The parts of an HF LLaMA config the graph depends on."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_type: str = "default"
    # Extra RoPE parameters (factor, low/high_freq_factor, original_max_position_embeddings).
    rope_params: tuple[tuple[str, float], ...] = ()
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> LlamaArch:
        """From an HF config dict (``LlamaConfig.to_dict()`` or a config.json)."""
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        head_dim = cfg.get("head_dim") or hidden // heads
        # transformers >= 5 keeps RoPE settings in rope_parameters; older configs use
        # rope_theta + rope_scaling.
        theta, rope_type, params = rope_settings(
            cfg.get("rope_parameters") or cfg.get("rope_scaling") or {},
            cfg.get("rope_theta", 10000.0),
        )
        act = str(cfg.get("hidden_act", "silu"))
        if act not in ("silu", "swish"):
            raise ValueError(f"unsupported activation {act!r}: the decoder graph runs SiLU")
        arch = cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=int(cfg["num_hidden_layers"]),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(head_dim),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-5)),
            rope_theta=theta,
            rope_type=rope_type,
            rope_params=params,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            hidden_act=act,
        )
        # RoPE is checked here, not first when a graph is built: an unknown type or missing
        # parameters are the config's fault (KeyError/ValueError, one line for the caller).
        if not np.all(np.isfinite(arch.inv_freq())):
            raise ValueError("RoPE parameters give non-finite frequencies")
        return arch

    def extra_tensor_names(self) -> tuple[str, ...]:
        """HF names of the family's tensors beyond LLaMA's (none here)."""
        return ()

    def inv_freq(self) -> np.ndarray:
        """RoPE inverse frequencies [head_dim / 2], as transformers computes them."""
        inv = default_inv_freq(self.rope_theta, self.head_dim)
        p = dict(self.rope_params)
        if self.rope_type == "default":
            return inv
        if self.rope_type == "linear":
            return inv / p["factor"]
        if self.rope_type == "llama3":
            factor, lo, hi = p["factor"], p["low_freq_factor"], p["high_freq_factor"]
            old = p["original_max_position_embeddings"]
            wavelen = 2 * math.pi / inv
            out = np.where(wavelen > old / lo, inv / factor, inv)
            smooth = (old / wavelen - lo) / (hi - lo)
            mid = (1 - smooth) * out / factor + smooth * out
            medium = (wavelen >= old / hi) & (wavelen <= old / lo)
            return np.where(medium, mid, out)
        raise ValueError(f"unsupported RoPE type {self.rope_type!r}")

    def rope_cache(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, sin [max_len, head_dim / 2] for GroupQueryAttention's do_rotary."""
        return cos_sin_cache(self.inv_freq(), max_len)


def _group_options_match(weights: DecoderWeights, names: Sequence[str]) -> bool:
    """Whether ``names`` fuse: the memory plan's rule (``plan.can_fuse``), so the plan counts
    the LoRA slots this graph builds."""
    ws = [weights.linears[n] for n in names]
    options = [QuantOption(w.bits, w.block_size) for w in ws]
    return memory_plan.can_fuse(options, [n in weights.biases for n in names])


class _DecoderBuilder:
    def __init__(
        self,
        arch: LlamaArch,
        weights: DecoderWeights,
        lora_ranks: LoraRanks | None,
        accuracy_level: int,
        lora_bits: int,
        external: dict[str, np.ndarray] | None = None,
        scratch: Any = None,
    ) -> None:
        self.arch = arch
        self.w = weights
        self.ranks = lora_ranks
        self.level = accuracy_level
        self.lora_bits = lora_bits
        self.g = GraphBuilder("coalora_llama_decoder", external=external, scratch=scratch)
        self.slots: list[LoraSlot] = []
        self._embed_q: dict[QuantOption, MatMulNBitsWeights] = {}

    def linear(self, x: str, members: Sequence[str], key: str) -> str:
        """One MatMulNBits over ``members`` stacked along N, plus their LoRA side branch."""
        ws = [self.w.linears[m] for m in members]
        w = ws[0] if len(ws) == 1 else concat_matmulnbits(ws)
        bias = None
        if members[0] in self.w.biases:
            bias = np.concatenate([self.w.biases[m] for m in members])
        y = self.g.matmulnbits(
            x, w, key, accuracy_level=self.level, bias=bias, computed=len(ws) > 1
        )
        if not self.ranks:
            return y
        outs = tuple(p.N for p in ws)
        rank = self.ranks.of(QuantOption(p.bits, p.block_size) for p in ws)
        slot = LoraSlot(key, tuple(members), w.K, outs, rank, self.lora_bits)
        self.slots.append(slot)
        return lora_branch(self.g, x, y, slot, self.w.lora, accuracy_level=self.level)

    def build(
        self,
        *,
        quantize_lm_head: QuantOption | None,
        quantize_embedding: QuantOption | None,
        quant_method: str,
        fuse_qkv: bool,
        fuse_gate_up: bool,
        max_seq_len: int,
        last_logits: bool = False,
        embedding_from_head: bool = False,
    ) -> ModelProto:
        a, w, g = self.arch, self.w, self.g
        n_layers, kv, hd = a.num_hidden_layers, a.num_key_value_heads, a.head_dim
        f32, i64 = TensorProto.FLOAT, TensorProto.INT64

        ids = g.input("input_ids", i64, ["batch_size", "sequence_length"])
        mask = g.input("attention_mask", i64, ["batch_size", "total_sequence_length"])
        past_shape = ["batch_size", kv, "past_sequence_length", hd]
        present_shape = ["batch_size", kv, "total_sequence_length", hd]
        for i in range(n_layers):
            for kind in ("key", "value"):
                g.input(f"past_key_values.{i}.{kind}", f32, past_shape)

        # GroupQueryAttention's sequence inputs, from the mask as the model builder does.
        summed = g.op("ReduceSum", [mask, g.const([1])], "/model/attn_mask/ReduceSum", keepdims=0)
        minus1 = g.op("Sub", [summed, g.const(1)], "/model/attn_mask/Sub")
        seqlens_k = g.op("Cast", [minus1], "/model/attn_mask/seqlens_k", to=TensorProto.INT32)
        mshape = g.op("Shape", [mask], "/model/attn_mask/Shape")
        total = g.op("Gather", [mshape, g.const(1)], "/model/attn_mask/Gather", axis=0)
        total_len = g.op("Cast", [total], "/model/attn_mask/total_len", to=TensorProto.INT32)

        rope = self.rope_caches(max_seq_len)
        if embedding_from_head:
            head = w.lm_head
            if not isinstance(head, MatMulNBitsWeights) or not a.tie_word_embeddings:
                raise ValueError("embedding_from_head needs a tied model with a quantized head")
            hidden = self._gather_rows(ids, head, fed=True)  # the head's codes, row by row
            embed = ""
        elif quantize_embedding is None:
            embed = g.initializer("model.embed_tokens.weight", w.embed_tokens)
            hidden = g.op("Gather", [embed, ids], "/model/embed_tokens/Gather", axis=0)
        else:
            hidden = self._quantized_embedding(ids, quantize_embedding, quant_method)
            embed = ""  # an fp32 head adds the fp32 table itself
        x = self.layers(
            self.scale_embedding(hidden), seqlens_k, total_len, rope, fuse_qkv, fuse_gate_up
        )

        shape_of = ids
        if last_logits:
            # Only the last position's logits: a prefill then runs the head once, not once
            # per prompt token, and never holds [seq, vocab] floats.
            x = g.op(
                "Slice",
                [x, g.const([-1]), g.const([np.iinfo(np.int64).max]), g.const([1])],
                "/model/last_position/Slice",
            )
            shape_of = x
        self._lm_head(x, shape_of, embed, quantize_lm_head, quant_method)
        seq = 1 if last_logits else "sequence_length"
        g.output("logits", f32, ["batch_size", seq, a.vocab_size])
        for i in range(n_layers):
            for kind in ("key", "value"):
                g.output(f"present.{i}.{kind}", f32, present_shape)
        meta = {
            ARCH_METADATA_KEY: json.dumps(asdict(a)),
            "coalora.lora_rank": str(self.ranks.rank if self.ranks else 0),
            "coalora.accuracy_level": str(self.level),
        }
        if self.ranks:
            meta[LORA_METADATA_KEY] = lora_slots_to_metadata(self.slots)
        return g.model(meta)

    def rope_caches(self, max_len: int) -> dict[str, tuple[str, str]]:
        """GroupQueryAttention's cos/sin cache initializers, by attention kind."""
        cos, sin = self.arch.rope_cache(max_len)
        return {
            "default": (self.g.initializer("cos_cache", cos), self.g.initializer("sin_cache", sin))
        }

    def scale_embedding(self, hidden: str) -> str:
        """The embedded tokens as the first block reads them (LLaMA: unscaled)."""
        return hidden

    def gate_up(self, x: str, i: int, fuse: bool) -> tuple[str, str]:
        """Layer ``i``'s gate and up projections: one fused MatMulNBits and a Split where
        their options match, else two."""
        pre = f"model.layers.{i}"
        names = [f"{pre}.mlp.gate_proj", f"{pre}.mlp.up_proj"]
        if fuse and _group_options_match(self.w, names):
            gu = self.linear(x, names, f"{pre}.mlp.gate_up_proj")
            gate, up = self.g.node(
                "Split", [gu], f"/model/layers.{i}/mlp/Split", outputs=2, axis=-1, num_outputs=2
            )
            return gate, up
        gate, up = (self.linear(x, [n], n) for n in names)
        return gate, up

    def norm_weight(self, name: str, arr: np.ndarray) -> str:
        """An RMSNorm's weight as the graph multiplies by it."""
        return self.g.initializer(name, np.asarray(arr, dtype=np.float32))

    def layers(
        self,
        hidden: str,
        seqlens_k: str,
        total_len: str,
        rope: dict[str, tuple[str, str]],
        fuse_qkv: bool,
        fuse_gate_up: bool,
    ) -> str:
        """The decoder blocks on the embedded tokens; returns the final-normed hidden state."""
        a, w, g = self.arch, self.w, self.g
        n_layers, eps = a.num_hidden_layers, a.rms_norm_eps
        kv, hd = a.num_key_value_heads, a.head_dim
        cos_name, sin_name = rope["default"]

        x = g.op(
            "SimplifiedLayerNormalization",
            [
                hidden,
                self.norm_weight("model.layers.0.input_layernorm.weight", w.input_layernorm[0]),
            ],
            "/model/layers.0/input_layernorm/SimplifiedLayerNorm",
            axis=-1,
            epsilon=eps,
            stash_type=1,
        )
        residual = hidden
        for i in range(n_layers):
            names = {p: llama_linear_name(i, p) for p in ("q_proj", "k_proj", "v_proj")}
            qkv = [names["q_proj"], names["k_proj"], names["v_proj"]]
            pre = f"model.layers.{i}"
            past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
            if fuse_qkv and _group_options_match(w, qkv):
                packed = self.linear(x, qkv, f"{pre}.self_attn.qkv_proj")
                qkv_in = [packed, "", ""]
            else:
                qkv_in = [self.linear(x, [n], n) for n in qkv]
            attn = g.node(
                "GroupQueryAttention",
                [*qkv_in, past_k, past_v, seqlens_k, total_len, cos_name, sin_name],
                f"/model/layers.{i}/attn/GroupQueryAttention",
                outputs=[
                    f"/model/layers.{i}/attn/output",
                    f"present.{i}.key",
                    f"present.{i}.value",
                ],
                domain=MS,
                num_heads=a.num_attention_heads,
                kv_num_heads=kv,
                scale=1.0 / math.sqrt(hd),
                do_rotary=1,
                rotary_interleaved=0,
                local_window_size=-1,
            )[0]
            o = self.linear(attn, [f"{pre}.self_attn.o_proj"], f"{pre}.self_attn.o_proj")
            x, _, _, residual = g.node(
                "SkipSimplifiedLayerNormalization",
                [
                    o,
                    residual,
                    self.norm_weight(
                        f"{pre}.post_attention_layernorm.weight", w.post_attention_layernorm[i]
                    ),
                ],
                f"/model/layers.{i}/post_attention_layernorm/SkipSimplifiedLayerNorm",
                outputs=[
                    f"/model/layers.{i}/post_attention_layernorm/output_0",
                    "",
                    "",
                    f"/model/layers.{i}/post_attention_layernorm/output_3",
                ],
                domain=MS,
                epsilon=eps,
            )
            gate, up = self.gate_up(x, i, fuse_gate_up)
            sig = g.op("Sigmoid", [gate], f"/model/layers.{i}/mlp/act_fn/Sigmoid")
            act = g.op("Mul", [gate, sig], f"/model/layers.{i}/mlp/act_fn/Mul")
            h = g.op("Mul", [act, up], f"/model/layers.{i}/mlp/Mul")
            down = self.linear(h, [f"{pre}.mlp.down_proj"], f"{pre}.mlp.down_proj")
            last = i == n_layers - 1
            nxt_name = (
                "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight"
            )
            nxt = w.norm if last else w.input_layernorm[i + 1]
            x, _, _, residual = g.node(
                "SkipSimplifiedLayerNormalization",
                [down, residual, self.norm_weight(nxt_name, nxt)],
                f"/model/layers.{i}/next_norm/SkipSimplifiedLayerNorm",
                outputs=[
                    f"/model/layers.{i}/next_norm/output_0",
                    "",
                    "",
                    "" if last else f"/model/layers.{i}/next_norm/output_3",
                ],
                domain=MS,
                epsilon=eps,
            )

        return x

    def _quantize_embed(self, option: QuantOption, method: str) -> MatMulNBitsWeights:
        # Cached: a tied model quantized with one option serves the gather and the head.
        if option not in self._embed_q:
            q = quantize(self.w.embed_tokens, option, method=method)  # type: ignore[arg-type]
            self._embed_q[option] = to_matmulnbits(q)
        return self._embed_q[option]

    def _quantized_embedding(self, ids: str, option: QuantOption, method: str) -> str:
        return self._gather_rows(ids, self._quantize_embed(option, method), fed=False)

    def _gather_rows(self, ids: str, w: MatMulNBitsWeights, *, fed: bool) -> str:
        """GatherBlockQuantized over the table ``w``: its arrays as initializers, or (``fed``)
        graph inputs holding only the rows a run needs."""
        g, a = self.g, self.arch
        if fed:
            # Shapes unstated: onnxruntime 1.32's shape inference for GatherBlockQuantized
            # refuses zero points and scales whose row count is symbolic (measured).
            u8, f32 = TensorProto.UINT8, TensorProto.FLOAT
            arrays = [g.input(n, t, None) for n, t in zip(EMBED_ROWS, (u8, f32, u8), strict=True)]
        else:
            data, scales, zeros = embedding_rows(w, a.vocab_size, a.hidden_size)
            arrays = [
                g.initializer("model.embed_tokens.qweight", np.ascontiguousarray(data)),
                g.initializer("model.embed_tokens.scales", scales),
                g.initializer("model.embed_tokens.qzeros", zeros),
            ]
        return g.op(
            "GatherBlockQuantized",
            [arrays[0], ids, arrays[1], arrays[2]],
            "/model/embed_tokens/GatherBlockQuantized",
            domain=MS,
            bits=w.bits,
            block_size=w.block_size,
            gather_axis=0,
            quantize_axis=1,
        )

    def _lm_head(
        self, x: str, ids: str, embed: str, option: QuantOption | None, method: str
    ) -> None:
        a, w, g = self.arch, self.w, self.g
        head = w.lm_head
        if isinstance(head, MatMulNBitsWeights) or option is not None:
            if not isinstance(head, MatMulNBitsWeights):
                if head is None:
                    head = self._quantize_embed(option, method)  # type: ignore[arg-type]
                else:
                    head = to_matmulnbits(quantize(head, option, method=method))  # type: ignore[arg-type]
            y = g.matmulnbits(x, head, "lm_head", accuracy_level=self.level)
            g.node("Identity", [y], "/lm_head/Identity", outputs=["logits"])
            return
        # fp32 head: Gemm with transB reads the [V, H] matrix as stored, so a tied head shares
        # the embedding's initializer instead of holding a transposed copy.
        if head is None and not embed:
            embed = g.initializer("model.embed_tokens.weight", w.embed_tokens)
        weight = embed if head is None else g.initializer("lm_head.weight", head)
        flat = g.op("Reshape", [x, g.const([-1, a.hidden_size])], "/lm_head/Reshape")
        y = g.op("Gemm", [flat, weight], "/lm_head/Gemm", transB=1)
        # [batch, seq] of the head's input (``ids``, or the sliced hidden state).
        bs = g.op("Shape", [ids], "/lm_head/Shape", end=2)
        shape = g.op("Concat", [bs, g.const([a.vocab_size])], "/lm_head/Concat", axis=0)
        g.node("Reshape", [y, shape], "/lm_head/Reshape_out", outputs=["logits"])


def _builder_class(arch: LlamaArch) -> type[_DecoderBuilder]:
    from coalora.runtime.graphs.gemma3 import Gemma3Arch, Gemma3Builder

    return Gemma3Builder if isinstance(arch, Gemma3Arch) else _DecoderBuilder


def build_decoder(
    arch: LlamaArch,
    weights: DecoderWeights,
    *,
    lora_rank: int | LoraRanks | None,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    lora_bits: int = 32,
    quantize_lm_head: QuantOption | None = None,
    quantize_embedding: QuantOption | None = None,
    quant_method: str = "rtn",
    fuse_qkv: bool = True,
    fuse_gate_up: bool = True,
    max_seq_len: int | None = None,
    external: dict[str, np.ndarray] | None = None,
    scratch: Any = None,
    last_logits: bool = False,
    embedding_from_head: bool = False,
) -> ModelProto:
    """The decoder graph for ``arch`` with ``weights``'s quantized linears: LLaMA blocks, or
    Gemma 3's for a ``gemma3.Gemma3Arch``.

    lora_rank         None/0: no side branch; else every target linear gets one of this rank
                      (initial values from ``weights.lora``, zeros where absent); a bundle's
                      ``LoraRanks`` widens the slots whose linears run the low-bit pair.
    accuracy_level    MatMulNBits accuracy_level (4: int8 activations, the fast CPU path).
    lora_bits         32: fp32 MatMul side branch; 8: A and B as 8-bit MatMulNBits (a quarter
                      of the bytes per token; see ``weights.LoraSlot`` for the names).
    quantize_lm_head  quantize an fp32 (or tied) LM head with this option; a head already
                      given as MatMulNBitsWeights is used as is.
    quantize_embedding
                      store the embedding table quantized (GatherBlockQuantized, same codes
                      layout); None keeps an fp32 Gather.
    quant_method      "rtn" or "search" for the two options above (build-time cost).
    fuse_qkv / fuse_gate_up
                      stack q/k/v (gate/up) into one MatMulNBits when their options match.
    max_seq_len       length of the RoPE cos/sin caches (default max_position_embeddings).
    external          a dict to receive every large initializer (name -> array, no copy),
                      which the proto then only references (see ``_onnx.GraphBuilder``);
                      build the session with ``runtime.session.create_session``. None: a
                      self-contained proto.
    scratch           with ``external``: where fused weights and packed LoRA go when only
                      prepacking MatMulNBits reads them (see ``_onnx.GraphBuilder``).
    last_logits       logits of the last position only ([batch, 1, vocab]): what decoding
                      needs; the head then runs once per prefill instead of once per token.
    embedding_from_head
                      a tied model whose head is given quantized: gather the token rows from
                      the head's own codes (GatherBlockQuantized), the fp32 table unused. The
                      rows come in as inputs (``EMBED_ROWS``, ``embedding_rows``'s layout) with
                      ``input_ids`` indexing them: the runtime reads them from the bundle file
                      (``runtime.table_rows``), so the table is held once, as the head's
                      prepacked copy (``plan.embedding_from_head`` decides; the plan counts
                      it so).
    """
    if weights.embed_tokens is None:
        if not embedding_from_head:
            raise ValueError("no embedding table: only a tied quantized head's gather can serve it")
    elif weights.embed_tokens.shape != (arch.vocab_size, arch.hidden_size):
        raise ValueError(
            f"embed_tokens is {weights.embed_tokens.shape}, the arch says "
            f"{(arch.vocab_size, arch.hidden_size)}"
        )
    if arch.head_dim % 16:
        raise ValueError(
            f"head_dim {arch.head_dim}: onnxruntime's GroupQueryAttention needs a multiple of 16"
        )
    ranks = slot_ranks(lora_rank)
    if lora_bits not in (8, 32):
        raise ValueError(f"lora_bits must be 8 or 32, got {lora_bits}")
    builder = _builder_class(arch)(
        arch,
        weights,
        ranks,
        accuracy_level,
        lora_bits,
        external=external,
        scratch=scratch,
    )
    return builder.build(
        quantize_lm_head=quantize_lm_head,
        quantize_embedding=quantize_embedding,
        quant_method=quant_method,
        fuse_qkv=fuse_qkv,
        fuse_gate_up=fuse_gate_up,
        max_seq_len=max_seq_len or arch.max_position_embeddings,
        last_logits=last_logits,
        embedding_from_head=embedding_from_head,
    )
