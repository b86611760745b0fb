"""Weights the graph builders take, and the LoRA initializers a session is given.

LoRA initializers. Every target linear ``y = W x`` gets a side branch ``s * (x A'^T) B^T`` with
A' [r, in] and B [out, r] (HF orientation). The graph holds them as two initializers that its
MatMul nodes read directly, so a session can replace them at creation with
``SessionOptions.add_initializer(name, OrtValue)``: onnxruntime applies such overrides only to
initializers that are consumed as they are (an initializer that feeds a Transpose or Concat is
constant-folded first and the override is silently ignored). Hence the stored layout is
already transposed, with the scale folded into B:

    lora.{key}.A   float32 [in, R]        columns = A'^T of each member, side by side
    lora.{key}.B   float32 [R, sum(out)]  block diagonal: rows of member j map to its outputs

With ``lora_bits=8`` the same two matrices are stored as 8-bit MatMulNBits weights
(``lora.{key}.A.qweight`` / ``.scales`` / ``.qzeros`` and the same for ``.B``): a quarter of
the bytes each token reads, at ~0.2% relative error on the LoRA delta.

``key`` is the HF module name (``model.layers.0.self_attn.q_proj``) for an unfused linear, or
the fused group's name (``model.layers.0.self_attn.qkv_proj``) when the builder fused several
linears into one MatMulNBits. ``LoraSlot`` records that mapping and is saved in the model's
metadata, so ``lora_initializers`` turns per-matrix adapters into session initializers
whatever the builder fused.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from coalora.kernels.matmulnbits import MatMulNBitsWeights, to_matmulnbits
from coalora.kernels.options import QuantOption
from coalora.kernels.quantize import QuantizedMatrix, quantize
from coalora.runtime.format.spec import LoraRanks

LORA_METADATA_KEY = "coalora.lora_slots"

Adapter = tuple[np.ndarray, np.ndarray]
"""(A' [r, in], B [out, r]) of one target linear, with the LoRA scale already folded into B."""


# 8-bit LoRA storage: A' rows are quantized along `in` (block 32), B rows along the rank
# (block 16, the smallest MatMulNBits block, so ranks 16/32/48 need no padding).
LORA_A_OPTION = QuantOption(8, 32)
LORA_B_OPTION = QuantOption(8, 16)
_MNB_PARTS = ("qweight", "scales", "qzeros")


def _rtn_zero_in_range(w: np.ndarray, option: QuantOption) -> MatMulNBitsWeights:
    """Round-to-nearest whose range always contains 0.

    MatMulNBits can only represent ranges that contain 0 (codes and zero point both lie in
    [0, 2^bits - 1]); a block whose values share one sign, common in a rank-4 row of B, would
    otherwise be clipped. Padding the last block with zeros then costs nothing.
    """
    n, k = w.shape
    bs = option.block_size
    nb = -(-k // bs)
    blocks = np.zeros((n, nb * bs), dtype=np.float32)
    blocks[:, :k] = w
    blocks = blocks.reshape(n, nb, bs)
    lo = np.minimum(blocks.min(-1), 0.0)
    hi = np.maximum(blocks.max(-1), 0.0)
    levels = option.levels
    scale = np.where(hi - lo > 1e-30, (hi - lo) / levels, 1.0).astype(np.float32)
    zero = np.clip(np.rint(-lo / scale), 0, levels)
    codes = np.clip(np.rint(blocks / scale[..., None]) + zero[..., None], 0, levels)
    return to_matmulnbits(
        QuantizedMatrix(
            option=option,
            in_features=k,
            codes=codes.astype(np.uint8),
            scales=scale,
            zero_points=zero.astype(np.uint8),
        )
    )


@dataclass(frozen=True)
class LoraSlot:
    """One pair of graph initializers serving one or more target linears (same input).

    ``bits`` 32: fp32 MatMul initializers ``lora.{key}.A`` / ``.B``. ``bits`` 8: the same
    matrices as 8-bit MatMulNBits weights (``lora.{key}.A.qweight/.scales/.qzeros`` and the
    same for B), a quarter of the bytes read per token.
    """

    key: str
    members: tuple[str, ...]
    in_features: int
    out_features: tuple[int, ...]
    rank: int
    bits: int = 32

    @property
    def a_name(self) -> str:
        return f"lora.{self.key}.A"

    @property
    def b_name(self) -> str:
        return f"lora.{self.key}.B"

    @property
    def a_shape(self) -> tuple[int, int]:
        return (self.in_features, self.rank * len(self.members))

    @property
    def b_shape(self) -> tuple[int, int]:
        return (self.rank * len(self.members), sum(self.out_features))

    def nbytes(self) -> int:
        """Bytes of the slot's A and B as the session holds them."""
        if self.bits == 32:
            return 4 * (self.a_shape[0] * self.a_shape[1] + self.b_shape[0] * self.b_shape[1])
        (k_a, n_a), (k_b, n_b) = self.a_shape, self.b_shape
        return LORA_A_OPTION.nbytes(n_a, k_a) + LORA_B_OPTION.nbytes(n_b, k_b)

    @property
    def initializer_names(self) -> list[str]:
        if self.bits == 32:
            return [self.a_name, self.b_name]
        return [f"{n}.{p}" for n in (self.a_name, self.b_name) for p in _MNB_PARTS]

    def dense(
        self, adapters: Mapping[str, Adapter], scale: float = 1.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """fp32 A [in, R] and block-diagonal B [R, sum(out)]; absent members get zeros."""
        r = self.rank
        a = np.zeros(self.a_shape, dtype=np.float32)
        b = np.zeros(self.b_shape, dtype=np.float32)
        col = 0
        for j, (name, out) in enumerate(zip(self.members, self.out_features, strict=True)):
            if name in adapters:
                a_m, b_m = (np.asarray(t, dtype=np.float32) for t in adapters[name])
                if a_m.shape != (r, self.in_features) or b_m.shape != (out, r):
                    raise ValueError(
                        f"LoRA for {name}: expected A' {(r, self.in_features)} and B "
                        f"{(out, r)}, got {a_m.shape} and {b_m.shape}"
                    )
                a[:, j * r : (j + 1) * r] = a_m.T
                b[j * r : (j + 1) * r, col : col + out] = scale * b_m.T
            col += out
        return a, b

    def quantized(
        self, adapters: Mapping[str, Adapter], scale: float = 1.0
    ) -> tuple[MatMulNBitsWeights, MatMulNBitsWeights]:
        """The 8-bit MatMulNBits weights computing ``x @ A`` and ``t @ B``."""
        a, b = self.dense(adapters, scale)
        return _rtn_zero_in_range(a.T, LORA_A_OPTION), _rtn_zero_in_range(b.T, LORA_B_OPTION)

    def pack(self, adapters: Mapping[str, Adapter], scale: float = 1.0) -> dict[str, np.ndarray]:
        """This slot's session initializers (name -> array)."""
        if self.bits == 32:
            a, b = self.dense(adapters, scale)
            return {self.a_name: a, self.b_name: b}
        out: dict[str, np.ndarray] = {}
        for name, w in zip(
            (self.a_name, self.b_name), self.quantized(adapters, scale), strict=True
        ):
            out.update(
                {
                    f"{name}.qweight": w.b,
                    f"{name}.scales": w.scales,
                    f"{name}.qzeros": w.zero_points,
                }
            )
        return out

    def to_json(self) -> dict[str, object]:
        return {
            "key": self.key,
            "members": list(self.members),
            "in_features": self.in_features,
            "out_features": list(self.out_features),
            "rank": self.rank,
            "bits": self.bits,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, object]) -> LoraSlot:
        return cls(
            key=str(d["key"]),
            members=tuple(d["members"]),  # type: ignore[arg-type]
            in_features=int(d["in_features"]),  # type: ignore[arg-type]
            out_features=tuple(int(o) for o in d["out_features"]),  # type: ignore[union-attr]
            rank=int(d["rank"]),  # type: ignore[arg-type]
            bits=int(d.get("bits", 32)),  # type: ignore[arg-type]
        )


def slot_ranks(lora_rank: int | LoraRanks | None) -> LoraRanks | None:
    """A graph builder's ``lora_rank``: None or 0 for no side branch, a rank for every slot,
    or a bundle's ``LoraRanks`` (a slot whose matrices run the low-bit pair is wider)."""
    if isinstance(lora_rank, LoraRanks):
        return lora_rank
    if lora_rank is not None and lora_rank < 0:
        raise ValueError("lora_rank must be positive")
    return LoraRanks(lora_rank) if lora_rank else None


def lora_slots_to_metadata(slots: Sequence[LoraSlot]) -> str:
    return json.dumps([s.to_json() for s in slots])


def lora_slots(model_or_metadata: object) -> list[LoraSlot]:
    """The LoRA slots of a built model (``onnx.ModelProto``) or of its metadata mapping
    (e.g. ``InferenceSession.get_modelmeta().custom_metadata_map``)."""
    if isinstance(model_or_metadata, Mapping):
        raw = model_or_metadata.get(LORA_METADATA_KEY)
    else:
        props = getattr(model_or_metadata, "metadata_props", [])
        raw = next((p.value for p in props if p.key == LORA_METADATA_KEY), None)
    if raw is None:
        return []
    return [LoraSlot.from_json(d) for d in json.loads(raw)]


def lora_initializers(
    slots: Sequence[LoraSlot], adapters: Mapping[str, Adapter], scale: float = 1.0
) -> dict[str, np.ndarray]:
    """Session initializers (name -> array) for per-matrix adapters, in the graph's layout.

    ``scale`` multiplies every B (pass the LoRA scale here if it is not folded in yet).
    """
    unknown = set(adapters) - {m for s in slots for m in s.members}
    if unknown:
        raise KeyError(f"adapters for matrices the graph has no LoRA slot for: {sorted(unknown)}")
    out: dict[str, np.ndarray] = {}
    for slot in slots:
        out.update(slot.pack(adapters, scale))
    return out


# --------------------------------------------------------------------------- LLaMA decoder


LLAMA_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
LLAMA_MLP = ("gate_proj", "up_proj", "down_proj")


def llama_linear_name(layer: int, proj: str) -> str:
    part = "self_attn" if proj in LLAMA_ATTN else "mlp"
    return f"model.layers.{layer}.{part}.{proj}"


@dataclass
class DecoderWeights:
    """Everything a LLaMA-family decoder graph needs, as numpy arrays (HF orientation)."""

    # float32 [V, H]; None where a tied quantized head's codes are the table (spec.EMBED_TOKENS)
    embed_tokens: np.ndarray | None
    input_layernorm: list[np.ndarray]  # per layer, float32 [H]
    post_attention_layernorm: list[np.ndarray]  # per layer, float32 [H]
    norm: np.ndarray  # float32 [H]
    linears: dict[str, MatMulNBitsWeights]  # "model.layers.{i}.self_attn.q_proj", ...
    # None: tied to embed_tokens. fp32 [V, H], or already quantized.
    lm_head: np.ndarray | MatMulNBitsWeights | None = None
    # Optional biases of target linears (attention_bias / mlp_bias configs), float32 [out].
    biases: dict[str, np.ndarray] = field(default_factory=dict)
    # Optional initial LoRA values baked into the graph; otherwise zeros (override per session).
    lora: dict[str, Adapter] = field(default_factory=dict)
    # The family's own small tensors by HF name (Gemma 3's q/k and feed-forward norms).
    extra: dict[str, np.ndarray] = field(default_factory=dict)


def llama_linear_shapes(arch: object) -> dict[str, tuple[int, int]]:
    """(out, in) of every target linear of a LLaMA arch (``LlamaArch``)."""
    h = arch.hidden_size  # type: ignore[attr-defined]
    hd = arch.head_dim  # type: ignore[attr-defined]
    q = arch.num_attention_heads * hd  # type: ignore[attr-defined]
    kv = arch.num_key_value_heads * hd  # type: ignore[attr-defined]
    i_ = arch.intermediate_size  # type: ignore[attr-defined]
    per_layer = {
        "q_proj": (q, h),
        "k_proj": (kv, h),
        "v_proj": (kv, h),
        "o_proj": (h, q),
        "gate_proj": (i_, h),
        "up_proj": (i_, h),
        "down_proj": (h, i_),
    }
    return {
        llama_linear_name(layer, p): shape
        for layer in range(arch.num_hidden_layers)  # type: ignore[attr-defined]
        for p, shape in per_layer.items()
    }


def quantize_linears(
    arrays: Mapping[str, np.ndarray],
    options: QuantOption | Mapping[str, QuantOption],
    names: Sequence[str],
    *,
    method: str = "search",
) -> dict[str, MatMulNBitsWeights]:
    """Quantize ``arrays[f"{name}.weight"]`` for every name into MatMulNBits form."""
    out: dict[str, MatMulNBitsWeights] = {}
    for name in names:
        opt = options if isinstance(options, QuantOption) else options[name]
        out[name] = to_matmulnbits(quantize(arrays[f"{name}.weight"], opt, method=method))  # type: ignore[arg-type]
    return out


def decoder_weights_from_arrays(
    arch: object,
    arrays: Mapping[str, np.ndarray],
    linears: Mapping[str, MatMulNBitsWeights],
    lora: Mapping[str, Adapter] | None = None,
) -> DecoderWeights:
    """Collect HF-named fp32 arrays (``model.embed_tokens.weight``, ...) and quantized linears."""
    n = arch.num_hidden_layers  # type: ignore[attr-defined]
    shapes = llama_linear_shapes(arch)
    missing = [k for k in shapes if k not in linears]
    if missing:
        raise KeyError(f"quantized weights missing for {missing[:3]} ({len(missing)} in all)")
    # Checked here, not left to the session: a graph fed its embedding rows has inputs of
    # unstated shape, so onnxruntime would only fail on the first run.
    for k, want in shapes.items():
        got = (linears[k].N, linears[k].K)
        if got != want:
            raise ValueError(
                f"{k} is {got[0]} x {got[1]}, the architecture says {want[0]} x {want[1]}"
            )

    def f32(key: str) -> np.ndarray:
        if key not in arrays:
            raise KeyError(f"weight {key!r} missing")
        return np.ascontiguousarray(arrays[key], dtype=np.float32)

    tied = arch.tie_word_embeddings or "lm_head.weight" not in arrays  # type: ignore[attr-defined]
    biases = {
        k[: -len(".bias")]: f32(k)
        for k in arrays
        if k.endswith(".bias") and k[: -len(".bias")] in linears
    }
    return DecoderWeights(
        embed_tokens=f32("model.embed_tokens.weight")
        if "model.embed_tokens.weight" in arrays
        else None,
        input_layernorm=[f32(f"model.layers.{i}.input_layernorm.weight") for i in range(n)],
        post_attention_layernorm=[
            f32(f"model.layers.{i}.post_attention_layernorm.weight") for i in range(n)
        ],
        norm=f32("model.norm.weight"),
        linears=dict(linears),
        lm_head=None if tied else f32("lm_head.weight"),
        biases=biases,
        lora=dict(lora or {}),
        extra={k: f32(k) for k in arch.extra_tensor_names()},  # type: ignore[attr-defined]
    )


def random_lora(
    shapes: Mapping[str, tuple[int, int]],
    rank: int,
    *,
    seed: int = 0,
    std: float = 0.05,
) -> dict[str, Adapter]:
    """Random (A' [r, in], B [out, r]) per matrix, for tests and benchmarks."""
    rng = np.random.default_rng(seed)
    return {
        name: (
            (rng.standard_normal((rank, k)) * std).astype(np.float32),
            (rng.standard_normal((n, rank)) * std).astype(np.float32),
        )
        for name, (n, k) in shapes.items()
    }
