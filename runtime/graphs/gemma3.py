"""ONNX graph of a Gemma 3 decoder: the LLaMA builder's inputs, KV cache, LoRA slots, embedding
and head (``llama``), with Gemma 3's blocks.

What differs from LLaMA (transformers' ``Gemma3TextModel``), and how the graph does it:

- the embedded tokens are scaled by sqrt(hidden) (one Mul after the gather);
- every RMSNorm multiplies by (1 + w): the graph's norm weights are stored as 1 + w, so the
  same SimplifiedLayerNormalization kernels run;
- q and k get an RMSNorm per head (over head_dim) before RoPE: a Reshape to
  [batch, seq, heads, head_dim], SimplifiedLayerNormalization on the last axis, and back;
- attention and MLP each have a pre- and a post-norm: the post-norm is a
  SimplifiedLayerNormalization of the block's output, whose Skip* with the residual also
  gives the next pre-norm;
- the MLP is GeGLU with tanh-GELU (``Gelu(approximate="tanh")``);
- attention scales by query_pre_attn_scalar ** -0.5;
- sliding-window layers run GroupQueryAttention with ``local_window_size`` and their own RoPE
  base (``rope_local_theta``); global layers see the whole cache with the global base.

One graph serves prefill and decode, as for LLaMA; the KV cache holds every position for
every layer (the sliding layers only read the last window of it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from coalora.runtime.graphs._onnx import MS
from coalora.runtime.graphs.llama import (
    LlamaArch,
    _DecoderBuilder,
    _group_options_match,
    cos_sin_cache,
    default_inv_freq,
    rope_settings,
)
from coalora.runtime.graphs.weights import llama_linear_name

SLIDING = "sliding_attention"
FULL = "full_attention"
# transformers' name for tanh-approximated GELU, the only activation Gemma 3 uses
GELU_TANH = "gelu_pytorch_tanh"
# Per-layer tensors Gemma 3 has beyond LLaMA's, relative to ``model.layers.{i}``.
EXTRA_LAYER_TENSORS = (
    "self_attn.q_norm.weight",
    "self_attn.k_norm.weight",
    "pre_feedforward_layernorm.weight",
    "post_feedforward_layernorm.weight",
)


@dataclass(frozen=True)
class Gemma3Arch(LlamaArch):
    """The parts of an HF Gemma 3 text config the graph depends on. ``rope_theta`` /
    ``rope_type`` / ``rope_params`` are the global layers'; the sliding layers use
    ``rope_local_theta`` (default RoPE)."""

    sliding_window: int = 512
    layer_types: tuple[str, ...] = ()
    rope_local_theta: float = 10000.0
    query_pre_attn_scalar: float = 256.0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> Gemma3Arch:
        """From an HF ``Gemma3TextConfig`` dict (transformers >= 5 keeps RoPE per layer type
        in ``rope_parameters``; older configs use rope_theta / rope_local_base_freq)."""
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            if cfg.get(key) is not None:
                raise ValueError(f"{key} is set: the Gemma 3 graph has no logit soft-capping")
        act = str(cfg.get("hidden_activation") or cfg.get("hidden_act") or GELU_TANH)
        if act != GELU_TANH:
            raise ValueError(f"unsupported activation {act!r}: the Gemma 3 graph runs {GELU_TANH}")
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        n_layers = int(cfg["num_hidden_layers"])
        rope = cfg.get("rope_parameters") or {}
        if FULL in rope or SLIDING in rope:
            theta, rope_type, params = rope_settings(rope.get(FULL) or {}, 1_000_000.0)
            local_theta, local_type, _ = rope_settings(rope.get(SLIDING) or {}, 10_000.0)
        else:
            theta, rope_type, params = rope_settings(
                {
                    "rope_theta": cfg.get("rope_theta", 1_000_000.0),
                    **(cfg.get("rope_scaling") or {}),
                },
                1_000_000.0,
            )
            local_theta, local_type = float(cfg.get("rope_local_base_freq", 10_000.0)), "default"
        if local_type != "default":
            raise ValueError(f"unsupported sliding-layer RoPE type {local_type!r}")
        types = cfg.get("layer_types")
        if types is None:  # every n-th layer global, as Gemma 3 configs say it
            pattern = int(
                cfg.get("sliding_window_pattern") or cfg.get("_sliding_window_pattern") or 6
            )
            types = [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers)]
        types = tuple(str(t) for t in types)
        if len(types) != n_layers or set(types) - {FULL, SLIDING}:
            raise ValueError(f"layer_types must be {n_layers} of {FULL!r} / {SLIDING!r}")
        window = int(cfg.get("sliding_window") or 0)
        if SLIDING in types and window < 1:
            raise ValueError("sliding layers need a sliding_window of at least 1")
        arch = cls(
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(cfg["intermediate_size"]),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=theta,
            rope_type=rope_type,
            rope_params=params,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            hidden_act=act,
            sliding_window=window,
            layer_types=types,
            rope_local_theta=float(local_theta),
            query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or 256.0),
        )
        if not np.all(np.isfinite(arch.inv_freq())) or not np.all(
            np.isfinite(arch.local_inv_freq())
        ):
            raise ValueError("RoPE parameters give non-finite frequencies")
        return arch

    def extra_tensor_names(self) -> tuple[str, ...]:
        return tuple(
            f"model.layers.{i}.{t}"
            for i in range(self.num_hidden_layers)
            for t in EXTRA_LAYER_TENSORS
        )

    def local_inv_freq(self) -> np.ndarray:
        return default_inv_freq(self.rope_local_theta, self.head_dim)

    def local_rope_cache(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        return cos_sin_cache(self.local_inv_freq(), max_len)

    @property
    def embed_scale(self) -> float:
        # transformers casts sqrt(hidden) to the weights' dtype (float32 here)
        return float(np.float32(self.hidden_size**0.5))


class Gemma3Builder(_DecoderBuilder):
    arch: Gemma3Arch

    def rope_caches(self, max_len: int) -> dict[str, tuple[str, str]]:
        g, a = self.g, self.arch
        cos, sin = a.rope_cache(max_len)
        out = {FULL: (g.initializer("cos_cache", cos), g.initializer("sin_cache", sin))}
        if SLIDING in a.layer_types:
            lcos, lsin = a.local_rope_cache(max_len)
            out[SLIDING] = (
                g.initializer("local_cos_cache", lcos),
                g.initializer("local_sin_cache", lsin),
            )
        return out

    def scale_embedding(self, hidden: str) -> str:
        scale = self.g.const(self.arch.embed_scale, np.float32)
        return self.g.op("Mul", [hidden, scale], "/model/embed_tokens/Scale")

    def norm_weight(self, name: str, arr: np.ndarray) -> str:
        # Gemma's RMSNorm multiplies by (1 + w); the kernels multiply by their weight.
        return super().norm_weight(name, 1.0 + np.asarray(arr, dtype=np.float32))

    def _norm(self, x: str, name: str, arr: np.ndarray, node: str) -> str:
        return self.g.op(
            "SimplifiedLayerNormalization",
            [x, self.norm_weight(name, arr)],
            node,
            axis=-1,
            epsilon=self.arch.rms_norm_eps,
            stash_type=1,
        )

    def _head_norm(self, x: str, name: str, node: str) -> str:
        """RMSNorm of every head of ``x`` [batch, seq, heads * head_dim] over head_dim."""
        g, hd = self.g, self.arch.head_dim
        heads = g.op("Reshape", [x, g.const([0, 0, -1, hd])], f"{node}/Reshape")
        normed = self._norm(heads, name, self.w.extra[name], f"{node}/SimplifiedLayerNorm")
        return g.op("Reshape", [normed, g.const([0, 0, -1])], f"{node}/Reshape_out")

    def _skip_norm(self, x: str, residual: str, name: str, arr: np.ndarray, node: str, last: bool):
        g = self.g
        out, _, _, summed = g.node(
            "SkipSimplifiedLayerNormalization",
            [x, residual, self.norm_weight(name, arr)],
            node,
            outputs=[f"{node}/output_0", "", "", "" if last else f"{node}/output_3"],
            domain=MS,
            epsilon=self.arch.rms_norm_eps,
        )
        return out, summed

    def layers(
        self,
        hidden: str,
        seqlens_k: str,
        total_len: str,
        rope: dict[str, tuple[str, str]],
        fuse_qkv: bool,
        fuse_gate_up: bool,
    ) -> str:
        a, w, g = self.arch, self.w, self.g
        n_layers, kv, hd = a.num_hidden_layers, a.num_key_value_heads, a.head_dim
        x = self._norm(
            hidden,
            "model.layers.0.input_layernorm.weight",
            w.input_layernorm[0],
            "/model/layers.0/input_layernorm/SimplifiedLayerNorm",
        )
        residual = hidden
        for i in range(n_layers):
            pre, node = f"model.layers.{i}", f"/model/layers.{i}"
            qkv = [llama_linear_name(i, p) for p in ("q_proj", "k_proj", "v_proj")]
            if fuse_qkv and _group_options_match(w, qkv):
                packed = self.linear(x, qkv, f"{pre}.self_attn.qkv_proj")
                sizes = [a.num_attention_heads * hd, kv * hd, kv * hd]
                q, k, v = g.node(
                    "Split", [packed, g.const(sizes)], f"{node}/attn/Split", outputs=3, axis=-1
                )
            else:
                q, k, v = (self.linear(x, [n], n) for n in qkv)
            q = self._head_norm(q, f"{pre}.self_attn.q_norm.weight", f"{node}/attn/q_norm")
            k = self._head_norm(k, f"{pre}.self_attn.k_norm.weight", f"{node}/attn/k_norm")
            sliding = a.layer_types[i] == SLIDING
            cos, sin = rope[a.layer_types[i]]
            attn = g.node(
                "GroupQueryAttention",
                [
                    q,
                    k,
                    v,
                    f"past_key_values.{i}.key",
                    f"past_key_values.{i}.value",
                    seqlens_k,
                    total_len,
                    cos,
                    sin,
                ],
                f"{node}/attn/GroupQueryAttention",
                outputs=[f"{node}/attn/output", f"present.{i}.key", f"present.{i}.value"],
                domain=MS,
                num_heads=a.num_attention_heads,
                kv_num_heads=kv,
                scale=1.0 / math.sqrt(a.query_pre_attn_scalar),
                do_rotary=1,
                rotary_interleaved=0,
                # the same number as transformers' sliding_window: tests/test_gemma3.py
                # matches torch with it, prefill and decode, on a prompt longer than the window
                local_window_size=a.sliding_window if sliding else -1,
            )[0]
            o = self.linear(attn, [f"{pre}.self_attn.o_proj"], f"{pre}.self_attn.o_proj")
            h = self._norm(
                o,
                f"{pre}.post_attention_layernorm.weight",
                w.post_attention_layernorm[i],
                f"{node}/post_attention_layernorm/SimplifiedLayerNorm",
            )
            ff = f"{pre}.pre_feedforward_layernorm.weight"
            x, residual = self._skip_norm(
                h,
                residual,
                ff,
                w.extra[ff],
                f"{node}/pre_feedforward_layernorm/SkipSimplifiedLayerNorm",
                False,
            )
            gate, up = self.gate_up(x, i, fuse_gate_up)
            act = g.op("Gelu", [gate], f"{node}/mlp/act_fn/Gelu", approximate="tanh")
            down = self.linear(
                g.op("Mul", [act, up], f"{node}/mlp/Mul"),
                [f"{pre}.mlp.down_proj"],
                f"{pre}.mlp.down_proj",
            )
            post = f"{pre}.post_feedforward_layernorm.weight"
            h = self._norm(
                down, post, w.extra[post], f"{node}/post_feedforward_layernorm/SimplifiedLayerNorm"
            )
            last = i == n_layers - 1
            nxt_name = (
                "model.norm.weight" if last else f"model.layers.{i + 1}.input_layernorm.weight"
            )
            nxt = w.norm if last else w.input_layernorm[i + 1]
            x, residual = self._skip_norm(
                h, residual, nxt_name, nxt, f"{node}/next_norm/SkipSimplifiedLayerNorm", last
            )
        return x
