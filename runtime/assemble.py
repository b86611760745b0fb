"""From a bundle and a configuration to the graph a session runs (and what it will cost).

Weights are views onto the memory-mapped bundle files (``mapped``). With ``external=True``
the graph builders leave every large initializer out of the proto and return the arrays
(those views, plus what the build computes: fused q/k/v and gate/up, the packed LoRA, in a
``Scratch`` whose pages can be given back once the session has prepacked them), so
``session.create_session`` hands them to onnxruntime without copying.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from onnx import ModelProto

from coalora.kernels import Configuration, QuantOption
from coalora.kernels.matmulnbits import DEFAULT_ACCURACY_LEVEL, MatMulNBitsWeights
from coalora.runtime.format.reader import Bundle, BundleError
from coalora.runtime.format.spec import (
    BASE_FILE,
    BERT,
    LLAMA,
    LM_HEAD,
    LORA_A,
    LORA_B,
    LORA_FILE,
    QWEIGHT,
    QZEROS,
    SCALES,
    TOKENIZER_FILE,
    family_named,
    quant_file,
    tensor_name,
)
from coalora.runtime.graphs.bert import BertArch, BertWeights, build_bert_classifier
from coalora.runtime.graphs.llama import LlamaArch, build_llama_decoder
from coalora.runtime.graphs.weights import (
    LORA_A_OPTION,
    LORA_B_OPTION,
    Adapter,
    LoraSlot,
    decoder_weights_from_arrays,
)
from coalora.runtime.mapped import MappedFileError, MappedSafetensors, Scratch
from coalora.runtime.plan import kv_cache_bytes_per_token

# 8-bit LoRA side branch: a quarter of the bytes per token of fp32 and measured faster
# (benchmarks/results/decode_speed_graph.md), at ~0.2% relative error on the delta.
DEFAULT_LORA_BITS = 8

Arch = LlamaArch | BertArch


def arch_of(bundle: Bundle) -> Arch:
    family = family_named(bundle.family)
    try:
        if family is LLAMA and bundle.task == LLAMA.task:
            return LlamaArch.from_config(bundle.model_config)
        if family is BERT and bundle.task == BERT.task:
            return BertArch.from_config(bundle.model_config)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{bundle.root}: architecture config is not usable ({exc})") from None
    raise BundleError(
        f"{bundle.root}: no device graph for family {bundle.family!r} with task {bundle.task!r}"
    )


def kv_bytes_per_token(arch: Arch) -> int:
    if isinstance(arch, BertArch):
        return 0
    return kv_cache_bytes_per_token(arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim)


def _slot_bytes(slot: LoraSlot) -> int:
    if slot.bits == 32:
        return 4 * (slot.a_shape[0] * slot.a_shape[1] + slot.b_shape[0] * slot.b_shape[1])
    (k_a, n_a), (k_b, n_b) = slot.a_shape, slot.b_shape
    return LORA_A_OPTION.nbytes(n_a, k_a) + LORA_B_OPTION.nbytes(n_b, k_b)


def _fused_groups(bundle: Bundle, config: Configuration | None) -> list[tuple[str, ...]]:
    """The matrices that share one LoRA slot in the runtime's graph: q/k/v and gate/up of a
    LLaMA layer when their options match (``fuse``), every other matrix alone."""
    names = [m.name for m in bundle.space.matrices]
    family = family_named(bundle.family)
    if config is None or family is None or not family.fused:
        return [(n,) for n in names]
    fused = {group[0]: group for group in family.fused}
    groups: list[tuple[str, ...]] = []
    done: set[str] = set()
    for n in names:
        if n in done:
            continue
        prefix, _, proj = n.rpartition(".")
        members = fused.get(proj)
        group = (n,)
        if members:
            cand = tuple(f"{prefix}.{p}" for p in members)
            if all(c in config for c in cand) and len({config[c] for c in cand}) == 1:
                group = cand
        groups.append(group)
        done.update(group)
    return groups


def lora_bytes(bundle: Bundle, lora_bits: int, config: Configuration | None = None) -> int:
    """Bytes of the session's LoRA: one A/B pair per slot. With ``config``, q/k/v and
    gate/up share a slot where the runtime fuses them (A side by side, B block-diagonal)."""
    total = 0
    for group in _fused_groups(bundle, config):
        specs = [bundle.space.matrix(n) for n in group]
        slot = LoraSlot(
            group[0],
            group,
            specs[0].in_features,
            tuple(m.out_features for m in specs),
            bundle.lora_rank,
            lora_bits,
        )
        total += _slot_bytes(slot)
    return total


# A loaded tokenizers.Tokenizer holds about this many times its tokenizer.json in RAM:
# measured (RSS before/after Tokenizer.from_file, tokenizers 0.23) 33.1 MB for SmolLM2's
# 1.56 MB file (21.2x) and 10.0 MB for all-MiniLM-L6-v2's 0.47 MB (21.4x).
TOKENIZER_RSS_FACTOR = 22


def tokenizer_bytes(bundle: Bundle) -> int:
    """RAM of the bundle's tokenizer once loaded (0 without one)."""
    size = bundle.file_bytes(TOKENIZER_FILE)
    return TOKENIZER_RSS_FACTOR * size if size else 0


def rope_cache_bytes(arch: Arch, context_length: int) -> int:
    return 0 if isinstance(arch, BertArch) else 4 * context_length * arch.head_dim


@dataclass
class MappedBundle:
    """The bundle's safetensors files, memory-mapped on first use."""

    bundle: Bundle
    _maps: dict[str, MappedSafetensors] = field(default_factory=dict)

    def file(self, rel: str) -> MappedSafetensors:
        if rel not in self._maps:
            try:
                self._maps[rel] = MappedSafetensors(self.bundle.file(rel))
            except MappedFileError as exc:
                raise BundleError(str(exc)) from None
        return self._maps[rel]

    def tensor(self, rel: str, name: str) -> np.ndarray:
        m = self.file(rel)
        if name not in m:
            raise BundleError(f"{self.bundle.root}: {rel} has no tensor {name!r}")
        return m[name]

    def base(self) -> dict[str, np.ndarray]:
        m = self.file(BASE_FILE)
        return {k: m[k] for k in m}

    def lora(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        names = [m.name for m in self.bundle.space.matrices]
        a = {n: self.tensor(LORA_FILE, tensor_name(n, LORA_A)) for n in names}
        b = {n: self.tensor(LORA_FILE, tensor_name(n, LORA_B)) for n in names}
        return a, b

    def linears(self, config: Configuration) -> dict[str, MatMulNBitsWeights]:
        self.bundle.check_config(config)
        out: dict[str, MatMulNBitsWeights] = {}
        for name, opt in config.items():
            rel = quant_file(opt)
            out[name] = self.bundle.matmulnbits(
                name,
                opt,
                *(self.tensor(rel, tensor_name(name, part)) for part in (QWEIGHT, SCALES, QZEROS)),
            )
        return out

    def release(self) -> None:
        for m in self._maps.values():
            m.release()


def _sources(base: dict[str, np.ndarray], linears: dict[str, MatMulNBitsWeights]) -> dict:
    out: dict[str, np.ndarray] = dict(base)
    for name, w in linears.items():
        out[tensor_name(name, QWEIGHT)] = w.b
        out[tensor_name(name, SCALES)] = w.scales
        out[tensor_name(name, QZEROS)] = w.zero_points
    return out


def _lm_head(bundle: Bundle, base: dict[str, np.ndarray], arch: LlamaArch) -> Any:
    name = bundle.lm_head
    if not name:
        return None
    try:
        opt = QuantOption.parse(name)
        w = MatMulNBitsWeights(
            b=base[tensor_name(LM_HEAD, QWEIGHT)],
            scales=base[tensor_name(LM_HEAD, SCALES)],
            zero_points=base[tensor_name(LM_HEAD, QZEROS)],
            K=arch.hidden_size,
            N=arch.vocab_size,
            bits=opt.bits,
            block_size=opt.block_size,
        )
    except KeyError as exc:
        raise BundleError(f"{bundle.root}: quantized lm_head tensor {exc} is missing") from None
    except ValueError as exc:
        raise BundleError(f"{bundle.root}: lm_head {name!r}: {exc}") from None
    if w.nbytes() != opt.nbytes(w.N, w.K):
        raise BundleError(f"{bundle.root}: quantized lm_head has the wrong size")
    return w


def build_graph(
    mapped: MappedBundle,
    arch: Arch,
    config: Configuration,
    *,
    context_length: int,
    lora_bits: int = DEFAULT_LORA_BITS,
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
    adapters: dict[str, Adapter] | None = None,
    external: bool = False,
    fuse: bool = False,
    scratch: Scratch | None = None,
    last_logits: bool = False,
) -> tuple[ModelProto, dict[str, np.ndarray]]:
    """The graph for ``config`` (zero LoRA unless ``adapters`` are given) and the arrays the
    session takes in place.

    ``external``: the proto holds no large initializer; the returned dict has them all
    (views of the mapped files, and the LoRA packed from ``adapters``), for
    ``create_session(initializers=...)``. Otherwise the proto is self-contained and the dict
    names the initializers it may take from the mapped files instead
    (``create_session(sources=...)``).
    """
    bundle = mapped.bundle
    base = mapped.base()
    linears = mapped.linears(config)
    rank = bundle.lora_rank
    held: dict[str, np.ndarray] | None = {} if external else None
    try:
        if isinstance(arch, LlamaArch):
            weights = decoder_weights_from_arrays(arch, base, linears, adapters)
            head = _lm_head(bundle, base, arch)
            if head is not None:
                weights.lm_head = head
            proto = build_llama_decoder(
                arch,
                weights,
                lora_rank=rank,
                lora_bits=lora_bits,
                accuracy_level=accuracy_level,
                max_seq_len=context_length,
                # Fused q/k/v and gate/up would be new arrays onnxruntime copies and keeps
                # next to its prepacked copy; unfused, every linear is a mapped view.
                fuse_qkv=fuse,
                fuse_gate_up=fuse,
                external=held,
                scratch=scratch,
                last_logits=last_logits,
            )
        else:
            prefix = "bert." if "bert.embeddings.word_embeddings.weight" in base else ""
            weights = BertWeights(base, linears, dict(adapters or {}), prefix)
            proto = build_bert_classifier(
                arch,
                weights,
                lora_rank=rank,
                lora_bits=lora_bits,
                accuracy_level=accuracy_level,
                external=held,
                scratch=scratch,
            )
    except KeyError as exc:
        raise BundleError(f"{bundle.root}: {exc.args[0] if exc.args else exc}") from None
    return proto, (held if held is not None else _sources(base, linears))
