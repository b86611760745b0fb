"""From a bundle and a configuration to the graph a session runs (what it costs: ``plan``).

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
from coalora.kernels.matmulnbits import DEFAULT_ACCURACY_LEVEL, MatMulNBitsWeights, dequantize
from coalora.runtime.format.reader import Bundle, BundleError, SharedLora
from coalora.runtime.format.spec import (
    BASE_FILE,
    BERT,
    EMBED_TOKENS,
    GEMMA3,
    LLAMA,
    LM_HEAD,
    LORA_FILE,
    QWEIGHT,
    QZEROS,
    SCALES,
    family_named,
    quant_file,
    tensor_name,
)
from coalora.runtime.graphs.bert import BertArch, BertWeights, build_bert_classifier
from coalora.runtime.graphs.gemma3 import Gemma3Arch
from coalora.runtime.graphs.llama import LlamaArch, build_decoder
from coalora.runtime.graphs.weights import (
    Adapter,
    decoder_weights_from_arrays,
)
from coalora.runtime.mapped import MappedFileError, MappedSafetensors, Scratch
from coalora.runtime.plan import embedding_from_head
from coalora.runtime.table_rows import HeadTableRows

# 8-bit LoRA side branch: a quarter of the bytes per token of fp32 and measured faster
# (benchmarks/results/decode_speed_graph.md), at ~0.2% relative error on the delta.
DEFAULT_LORA_BITS = 8

Arch = LlamaArch | BertArch


def arch_of(bundle: Bundle) -> Arch:
    family = family_named(bundle.family)
    try:
        if family is LLAMA and bundle.task == LLAMA.task:
            return LlamaArch.from_config(bundle.model_config)
        if family is GEMMA3 and bundle.task == GEMMA3.task:
            return Gemma3Arch.from_config(bundle.model_config)
        if family is BERT and bundle.task == BERT.task:
            return BertArch.from_config(bundle.model_config)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{bundle.root}: architecture config is not usable ({exc})") from None
    raise BundleError(
        f"{bundle.root}: no device graph for family {bundle.family!r} with task {bundle.task!r}"
    )


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

    def lora(self) -> SharedLora:
        return self.bundle.read_lora(lambda name: self.tensor(LORA_FILE, name))

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


def lm_head(mapped: MappedBundle, arch: LlamaArch, config: Configuration | None = None) -> Any:
    """The quantized LM head serving ``config`` (the option it names, else the bundle's
    default), or None where the head is fp32."""
    opt = mapped.bundle.head_option(config)
    return None if opt is None else head_at(mapped, arch, opt)


def head_at(mapped: MappedBundle, arch: LlamaArch, opt: QuantOption) -> MatMulNBitsWeights:
    """The LM head's codes at ``opt``, from the file that holds them, checked for size."""
    bundle = mapped.bundle
    rel = bundle.head_source(opt)
    try:
        w = MatMulNBitsWeights(
            b=mapped.tensor(rel, tensor_name(LM_HEAD, QWEIGHT)),
            scales=mapped.tensor(rel, tensor_name(LM_HEAD, SCALES)),
            zero_points=mapped.tensor(rel, tensor_name(LM_HEAD, QZEROS)),
            K=arch.hidden_size,
            N=arch.vocab_size,
            bits=opt.bits,
            block_size=opt.block_size,
        )
    except ValueError as exc:
        raise BundleError(f"{bundle.root}: lm_head {opt}: {exc}") from None
    if w.nbytes() != opt.nbytes(w.N, w.K):
        raise BundleError(f"{bundle.root}: quantized lm_head at {opt} has the wrong size")
    return w


def head_table_rows(
    mapped: MappedBundle, arch: Arch, accuracy_level: int, config: Configuration | None = None
) -> HeadTableRows | None:
    """The reader of the embedding rows a graph built by ``build_graph`` for ``config`` at
    ``accuracy_level`` is fed (``graphs.llama.EMBED_ROWS``), or None if it has its table."""
    if not isinstance(arch, LlamaArch):
        return None
    opt = embedding_from_head(mapped.bundle, arch, accuracy_level, config)
    if opt is None:
        return None
    rel = mapped.bundle.head_source(opt)
    return HeadTableRows(
        mapped.file(rel), head_at(mapped, arch, opt), arch.vocab_size, arch.hidden_size
    )


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
    with_lora: bool = True,
) -> tuple[ModelProto, dict[str, np.ndarray]]:
    """The graph for ``config`` (zero LoRA unless ``adapters`` are given) and the arrays the
    session takes in place.

    ``external``: the proto holds no large initializer; the returned dict has them all
    (views of the mapped files, and the LoRA packed from ``adapters``), for
    ``create_session(initializers=...)``. Otherwise the proto is self-contained and the dict
    names the initializers it may take from the mapped files instead
    (``create_session(sources=...)``).

    ``with_lora=False``: the same graph without the LoRA side branch (what it costs is
    measured against it: benchmarks/lora_cost.py).
    """
    bundle = mapped.bundle
    base = mapped.base()
    linears = mapped.linears(config)
    rank = bundle.lora_ranks if with_lora else None
    held: dict[str, np.ndarray] | None = {} if external else None
    try:
        if isinstance(arch, LlamaArch):
            try:
                weights = decoder_weights_from_arrays(arch, base, linears, adapters)
            except ValueError as exc:
                raise BundleError(f"{bundle.root}: {exc}") from None
            head = lm_head(mapped, arch, config)
            if head is not None:
                weights.lm_head = head
                if config.head is not None:
                    # the graph names the head's initializers as the base file does: take them
                    # from the configured head's file, not the default head's
                    base = {
                        **base,
                        tensor_name(LM_HEAD, QWEIGHT): head.b,
                        tensor_name(LM_HEAD, SCALES): head.scales,
                        tensor_name(LM_HEAD, QZEROS): head.zero_points,
                    }
            gather = (
                head is not None
                and embedding_from_head(bundle, arch, accuracy_level, config) is not None
            )
            if weights.embed_tokens is None and not gather:
                if head is None:
                    raise BundleError(f"{bundle.root}: {EMBED_TOKENS} is missing")
                # the table is the head's codes (spec.EMBED_TOKENS): dequantized for a graph
                # that cannot gather them (the exact one)
                weights.embed_tokens = dequantize(head)
            proto = build_decoder(
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
                embedding_from_head=gather,
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
