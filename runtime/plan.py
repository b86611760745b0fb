"""The memory accountant: every byte the process holds when it serves a configuration.

A byte budget ("600MB") covers the whole process, so a configuration fits only if all of
these do (see the design's "Quantization configuration"):

- quantized weights: as MatMulNBits holds them once prepacked (``prepacked_bytes``)
- other weights: embeddings, norms, the LM head (the bundle's base file), θ, the RoPE cache;
  a tied quantized head is also the embedding, held once (``embedding_from_head``)
- the LoRA side branch: one A'/B slot per matrix, or per fused group (``fused_groups``)
- the KV cache at the full context length
- the runtime itself (``DEFAULT_OVERHEAD``) and the loaded tokenizer
- while the session is built, the fused copies of q/k/v and gate/up: they sit in scratch
  pages next to their prepacked copies until the session exists (the process's peak)

Address space is planned apart (``address_space_bytes``, for ``RLIMIT_AS``): the whole of
every mapped option file, allocator arenas and stacks per thread, none of them resident.

``Accountant`` holds these for one bundle; ``Runtime`` plans every configuration with it. The
rule that decides which projections share one fused MatMulNBits (and so one LoRA slot) is
``can_fuse``, and the graph builders ask it too, so the plan counts what is built.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from coalora.kernels.config import ConfigSpace, Configuration
from coalora.kernels.matmulnbits import DEFAULT_ACCURACY_LEVEL, exact_as_fp32
from coalora.kernels.options import QuantOption
from coalora.runtime.format.reader import Bundle
from coalora.runtime.format.spec import (
    BASE_FILE,
    EMBED_TOKENS,
    TOKENIZER_FILE,
    Family,
    family_named,
    quant_file,
)

# The graph modules (the slot layout, the architectures) come with onnx: imported where used,
# so planning alone (selection, a dry run) loads no onnx.

DEFAULT_OVERHEAD = 120 * 2**20
"""Resident memory of the runtime around a model's weights: 120 MiB (125.8 MB).

Measured on the 2-core x86-64 machine (Python 3.11, numpy, onnxruntime 1.32, onnx 1.23,
tokenizers 0.23, psutil 7.2) in a fresh interpreter: the runtime's imports (engine, CLI,
typer, rich) take 102.7 MB of RSS (47 MB anonymous, 56 MB of shared libraries); serving the
tiny test bundle (0.4 MB of weights, context 64) peaks at 122.4 MB on one intra-op thread and
122.6 MB on two (VmHWM). So 120 MiB is the runtime with its session, thread pool and
allocator arenas; the KV cache and a real tokenizer are planned separately. (It was 64 MiB,
measured before the runtime imported onnx; a tiny bundle then peaked at 1.8x its plan.)
"""


# MatMulNBits prepacks its weights into buffers larger than the stored codes, scales and zero
# points (block sums and per-block figures for the int8 kernels, padding). Measured as the
# anonymous RSS a one-node session holds once its mapped arrays are dropped (onnxruntime
# 1.32, x86-64, accuracy level 4; benchmarks/results/prepacked_memory.md), over SmolLM2-,
# Gemma- and Qwen2.5-0.5B-shaped matrices: 2-bit 1.36-1.83x (2b32 the most), 4-bit
# 1.25-1.45x, 8-bit 1.13-1.23x the option's bytes.
# The plan takes each width's largest, rounded up. Where a kernel reads the originals instead
# (2/8 bits on a Cortex-A72) it holds the stored bytes, fewer.
PREPACKED_FACTOR = {2: 1.85, 4: 1.45, 8: 1.25}


def prepacked_bytes(option: QuantOption, out_features: int, in_features: int) -> int:
    """Resident bytes of one matrix once MatMulNBits has prepacked it."""
    return math.ceil(PREPACKED_FACTOR[option.bits] * option.nbytes(out_features, in_features))


def quantized_resident_bytes(space: ConfigSpace, config: Mapping[str, QuantOption]) -> int:
    return sum(
        prepacked_bytes(config[m.name], m.out_features, m.in_features) for m in space.matrices
    )


EXACT_FP32_COPIES = 2
"""Copies of a matrix the exact graph holds dequantized (``kernels.matmulnbits.exact_as_fp32``):
the fp32 array and onnxruntime's prepacked copy of it; the plan adds the transient of
dequantizing the largest. Turning prepacking off would save the copy but sends 4-bit
MatMulNBits at accuracy level 0 to a far slower path, so the copy is planned for instead."""


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes the process holds when serving one configuration."""

    quantized_weights_bytes: int
    other_weights_bytes: int
    lora_bytes: int
    kv_cache_bytes: int
    runtime_overhead_bytes: int
    build_scratch_bytes: int = 0  # fused copies held only while the session is built
    # virtual size the process reaches (not part of ``total``); 0: not planned
    address_space_bytes: int = 0

    @property
    def total(self) -> int:
        return (
            self.quantized_weights_bytes
            + self.other_weights_bytes
            + self.lora_bytes
            + self.kv_cache_bytes
            + self.runtime_overhead_bytes
            + self.build_scratch_bytes
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantized_weights_bytes": self.quantized_weights_bytes,
            "other_weights_bytes": self.other_weights_bytes,
            "lora_bytes": self.lora_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "runtime_overhead_bytes": self.runtime_overhead_bytes,
            "build_scratch_bytes": self.build_scratch_bytes,
            "total": self.total,
            "address_space_bytes": self.address_space_bytes,
        }


def kv_cache_bytes_per_token(
    n_layers: int, n_kv_heads: int, head_dim: int, dtype_bytes: int = 4
) -> int:
    """Keys and values of one token across all layers (fp32 by default, as the runtime runs)."""
    for name, value in (
        ("n_layers", n_layers),
        ("n_kv_heads", n_kv_heads),
        ("head_dim", head_dim),
        ("dtype_bytes", dtype_bytes),
    ):
        if value <= 0:
            raise ValueError(f"{name} must be positive, got {value}")
    return 2 * n_layers * n_kv_heads * head_dim * dtype_bytes


def plan_memory(
    space: ConfigSpace,
    config: Mapping[str, QuantOption],
    *,
    other_weights_bytes: int,
    lora_bytes: int,
    kv_bytes_per_token: int,
    context_length: int,
    overhead_bytes: int = DEFAULT_OVERHEAD,
    quantized_bytes: int | None = None,
    build_scratch_bytes: int = 0,
    address_space_bytes: int = 0,
) -> MemoryPlan:
    """The plan for ``config``; the KV cache is sized for the full ``context_length``.

    An encoder (classification) passes ``kv_bytes_per_token=0``. ``quantized_bytes``: what
    the matrices take when not their packed size (an exact graph's dequantized ones).
    """
    for name, value in (
        ("other_weights_bytes", other_weights_bytes),
        ("lora_bytes", lora_bytes),
        ("kv_bytes_per_token", kv_bytes_per_token),
        ("context_length", context_length),
        ("overhead_bytes", overhead_bytes),
        ("build_scratch_bytes", build_scratch_bytes),
        ("address_space_bytes", address_space_bytes),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    return MemoryPlan(
        quantized_weights_bytes=quantized_resident_bytes(space, config)
        if quantized_bytes is None
        else quantized_bytes,
        other_weights_bytes=int(other_weights_bytes),
        lora_bytes=int(lora_bytes),
        kv_cache_bytes=int(kv_bytes_per_token) * int(context_length),
        runtime_overhead_bytes=int(overhead_bytes),
        build_scratch_bytes=int(build_scratch_bytes),
        address_space_bytes=int(address_space_bytes),
    )


# -- what the device holds besides the quantized weights ------------------------------------------
# A loaded tokenizer holds about this many times its tokenizer.json in RAM. A bare
# Tokenizer.from_file (tokenizers 0.23) measured 21.2x for SmolLM2's 1.56 MB file and 21.4x
# for all-MiniLM-L6-v2's 0.47 MB; the runtime's own load (RSS before/after the first
# ``Runtime.tokenizer`` of an opened runtime) holds more: +42 MB for SmolLM2 (26.9x) and
# +379 MB for Gemma 3's 14.4 MB file (26.4x).
TOKENIZER_RSS_FACTOR = 28


def tokenizer_bytes(bundle: Bundle) -> int:
    """RAM of the bundle's tokenizer once loaded (0 without one)."""
    size = bundle.file_bytes(TOKENIZER_FILE)
    return TOKENIZER_RSS_FACTOR * size if size else 0


def kv_bytes_per_token(arch: Any) -> int:
    """KV cache bytes per token of ``arch`` (an encoder classifies in one pass: none)."""
    from coalora.runtime.graphs.bert import BertArch

    if isinstance(arch, BertArch):
        return 0
    return kv_cache_bytes_per_token(arch.num_hidden_layers, arch.num_key_value_heads, arch.head_dim)


def rope_cache_bytes(arch: Any, context_length: int) -> int:
    from coalora.runtime.graphs.bert import BertArch

    return 0 if isinstance(arch, BertArch) else 4 * context_length * arch.head_dim


# -- the embedding table --------------------------------------------------------------------------
# GatherBlockQuantized (onnxruntime 1.32) reads 4- and 8-bit codes.
GATHER_BITS = frozenset({4, 8})


def embedding_from_head(
    bundle: Bundle, arch: Any, accuracy_level: int, config: Configuration | None = None
) -> QuantOption | None:
    """The option whose codes serve the token embedding as well as the LM head serving
    ``config`` (the head it names, else the bundle's default), or None.

    A tied model's quantized head is its embedding table quantized, so the fast graph gathers
    the rows from the head's codes (GatherBlockQuantized on the rows a run needs, read from
    the file: ``runtime.table_rows``) and holds no table beside the head's prepacked codes.
    Only where the layouts agree (whole blocks per row, a width the gather reads); the
    exact graph reads an fp32 table: the
    bundle's, or, where the bundle ships none (``spec.EMBED_TOKENS``), the head's codes
    dequantized.
    """
    option = bundle.head_option(config)
    return option if gathers(arch, option, accuracy_level) else None


def gathers(arch: Any, option: QuantOption | None, accuracy_level: int) -> bool:
    """Whether the fast graph gathers a tied decoder's embedding rows from the codes of its
    head at ``option`` (``embedding_from_head``)."""
    from coalora.runtime.graphs.llama import LlamaArch

    if not isinstance(arch, LlamaArch) or not arch.tie_word_embeddings or accuracy_level == 0:
        return False
    if option is None:
        return False
    return option.bits in GATHER_BITS and arch.hidden_size % option.block_size == 0


def fed_rows_bytes(arch: Any, option: QuantOption, context_length: int) -> int:
    """The embedding rows a run is fed at most (a prefill of the whole context, each token
    distinct), when the table is the tied head's codes."""
    return min(context_length, arch.vocab_size) * option.nbytes(1, arch.hidden_size)


# -- fused groups and LoRA slots ------------------------------------------------------------------
def can_fuse(options: Sequence[QuantOption], biased: Sequence[bool] = ()) -> bool:
    """Whether projections that read one input share one fused MatMulNBits (and one LoRA slot):
    all at the same option, and all or none with a bias (the fused kernel takes one bias)."""
    return len(set(options)) == 1 and len(set(biased)) <= 1


def fused_groups(
    space: ConfigSpace,
    config: Mapping[str, QuantOption] | None,
    family: Family | None,
    biased: Collection[str] = (),
) -> list[tuple[str, ...]]:
    """The matrices that share one LoRA slot in the runtime's graph: a family's fused
    projections of one block (``Family.fused``: q/k/v and gate/up of a LLaMA layer) where
    ``can_fuse`` says so, every other matrix alone. ``config=None``: nothing fuses."""
    names = [m.name for m in space.matrices]
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
            if all(c in config for c in cand) and can_fuse(
                [config[c] for c in cand], [c in biased for c in cand]
            ):
                group = cand
        groups.append(group)
        done.update(group)
    return groups


def slot_bytes(space: ConfigSpace, group: Sequence[str], rank: int, lora_bits: int) -> int:
    """Bytes of the LoRA slot that ``group`` shares (``graphs.weights.LoraSlot``)."""
    from coalora.runtime.graphs.weights import LoraSlot

    specs = [space.matrix(n) for n in group]
    out = tuple(m.out_features for m in specs)
    slot = LoraSlot(group[0], tuple(group), specs[0].in_features, out, rank, lora_bits)
    return slot.nbytes()


def lora_bytes(
    bundle: Bundle,
    lora_bits: int,
    config: Mapping[str, QuantOption] | None = None,
    biased: Collection[str] = (),
) -> int:
    """Bytes of the session's LoRA: one A/B pair per slot. With ``config``, q/k/v and
    gate/up share a slot where the runtime fuses them (A side by side, B block-diagonal), and
    a slot whose matrices run the low-bit pair is wider (``spec.LoraRanks``); without it,
    every slot is counted at its widest."""
    groups = fused_groups(bundle.space, config, family_named(bundle.family), biased)
    ranks = bundle.lora_ranks
    return sum(
        slot_bytes(
            bundle.space,
            g,
            ranks.of(bundle.space.options if config is None else [config[n] for n in g]),
            lora_bits,
        )
        for g in groups
    )


# -- address space ----------------------------------------------------------------------------
# Virtual size beyond the resident plan, for RLIMIT_AS (``ulimit -v``). Measured on the demo
# bundle (SmolLM2-135M, x86-64, glibc): from the selection to the end of a generation the
# virtual size grew by 275-505 MB on 1 intra-op thread and 350-581 MB on 2, against resident
# plans of 235-409 MB without the runtime (already mapped when the probe reads the size): each
# thread reserves a glibc arena (64 MiB) and a stack (8 MiB), and the prepacked MatMulNBits
# weights reserve up to a quarter of their codes again. The figures below bound every one of
# those measurements.
THREAD_ADDRESS_SPACE = 80 * 2**20
PREPACK_ADDRESS_FRACTION = 0.25


# -- the accountant of one served bundle ----------------------------------------------------------
def head_and_table_bytes(
    bundle: Bundle,
    arch: Any,
    option: QuantOption | None,
    accuracy_level: int,
    context_length: int,
    table_shipped: bool,
) -> int:
    """Bytes the LM head at ``option`` (None: fp32, in the base file) and the token table it
    serves add to the base file without any head codes."""
    from coalora.runtime.graphs.llama import LlamaArch

    if not isinstance(arch, LlamaArch):
        return 0
    v, h = arch.vocab_size, arch.hidden_size
    table = 4 * v * h
    out = 0
    if gathers(arch, option, accuracy_level):
        # Neither the fp32 table nor the head's mapped codes are read: each run is fed its
        # tokens' rows, read from the file (runtime.table_rows), so the head's prepacked copy
        # is the only one held.
        out += fed_rows_bytes(arch, option, context_length)
        out -= table if table_shipped else 0
    elif not table_shipped:
        out += table  # dequantized from the head's codes (spec.EMBED_TOKENS)
    if option is not None:
        if exact_as_fp32(option.bits, accuracy_level):
            # the exact graph holds the quantized head dequantized next to its codes, twice,
            # plus the transient of dequantizing it (the graph's largest matrix), and the
            # stored codes
            out += option.nbytes(v, h) + (EXACT_FP32_COPIES + 1) * 4 * v * h
        else:
            out += prepacked_bytes(option, v, h)  # its prepacked copy, larger than stored
    return out


@dataclass(frozen=True)
class Accountant:
    """Every byte of serving one bundle at one context length and LoRA precision."""

    bundle: Bundle
    lora_bits: int
    context_length: int
    other_weights_bytes: int  # base file but the LM head + RoPE cache + θ
    kv_bytes_per_token: int
    overhead_bytes: int  # the runtime + the loaded tokenizer
    biased: frozenset[str] = frozenset()  # quantized matrices with a bias
    accuracy_level: int = DEFAULT_ACCURACY_LEVEL  # 0: the exact graph (``exact_as_fp32``)
    threads: int = 1  # intra-op threads: each reserves address space
    # the LM head and the token table it serves, per head option (None: the fp32 head or
    # none, or the default head of a configuration that names none)
    head_bytes: Mapping[QuantOption | None, int] = field(default_factory=dict)

    @classmethod
    def for_bundle(
        cls,
        bundle: Bundle,
        arch: Any,
        *,
        base_bytes: int,
        base_names: Collection[str],
        context_length: int,
        lora_bits: int,
        theta_bytes: int,
        accuracy_level: int = DEFAULT_ACCURACY_LEVEL,
        threads: int = 1,
    ) -> Accountant:
        """``base_bytes``/``base_names``: the size and tensor names of the base file."""
        names = [m.name for m in bundle.space.matrices]
        default = bundle.head_option()
        if default is not None:  # the default head's stored codes are in the base file
            base_bytes -= default.nbytes(arch.vocab_size, arch.hidden_size)
        shipped = EMBED_TOKENS in base_names
        heads = {
            option: head_and_table_bytes(
                bundle, arch, option, accuracy_level, context_length, shipped
            )
            for option in {default, *bundle.space.head_options}
        }
        heads[None] = heads[default]
        return cls(
            bundle=bundle,
            lora_bits=lora_bits,
            context_length=context_length,
            other_weights_bytes=base_bytes + rope_cache_bytes(arch, context_length) + theta_bytes,
            kv_bytes_per_token=kv_bytes_per_token(arch),
            overhead_bytes=DEFAULT_OVERHEAD + tokenizer_bytes(bundle),
            biased=frozenset(n for n in names if f"{n}.bias" in base_names),
            accuracy_level=accuracy_level,
            threads=threads,
            head_bytes=heads,
        )

    def fused_groups(self, config: Mapping[str, QuantOption]) -> list[tuple[str, ...]]:
        return fused_groups(
            self.bundle.space, config, family_named(self.bundle.family), self.biased
        )

    def fused_copy_bytes(self, config: Mapping[str, QuantOption]) -> int:
        """Bytes of the fused q/k/v and gate/up weights the build writes to scratch pages:
        they are resident, next to their prepacked copies, until the session exists."""
        space = self.bundle.space
        return sum(
            config[n].nbytes(space.matrix(n).out_features, space.matrix(n).in_features)
            for group in self.fused_groups(config)
            if len(group) > 1
            for n in group
        )

    def mapped_file_bytes(self, config: Mapping[str, QuantOption]) -> int:
        """Bytes of the option files ``config`` maps, whole (matrices it does not use too),
        and the file of the head it names where that is not the base file."""
        files = {quant_file(o) for o in config.values()}
        head = getattr(config, "head", None)
        if head is not None and self.bundle.head_source(head) != BASE_FILE:
            files.add(self.bundle.head_source(head))
        return sum(self.bundle.file_bytes(rel) or 0 for rel in files)

    def plan(self, config: Mapping[str, QuantOption]) -> MemoryPlan:
        """The memory plan of serving ``config`` (with the LM head it names, else the
        bundle's default)."""
        head = getattr(config, "head", None)
        plan = plan_memory(
            self.bundle.space,
            config,
            other_weights_bytes=self.other_weights_bytes + self.head_bytes[head],
            lora_bytes=lora_bytes(self.bundle, self.lora_bits, config, self.biased),
            kv_bytes_per_token=self.kv_bytes_per_token,
            context_length=self.context_length,
            overhead_bytes=self.overhead_bytes,
            quantized_bytes=self._quantized_bytes(config),
            build_scratch_bytes=self.fused_copy_bytes(config),
        )
        # The runtime is mapped before any probe reads the virtual size: not counted again.
        address = (
            plan.total
            - DEFAULT_OVERHEAD
            + max(0, self.mapped_file_bytes(config) - plan.quantized_weights_bytes)
            + int(PREPACK_ADDRESS_FRACTION * plan.quantized_weights_bytes)
            + self.threads * THREAD_ADDRESS_SPACE
        )
        return replace(plan, address_space_bytes=max(0, address))

    def _quantized_bytes(self, config: Mapping[str, QuantOption]) -> int | None:
        """The matrices' bytes where an exact graph holds some dequantized (fp32), else None
        (their packed size): ``EXACT_FP32_COPIES`` of each, plus the transient of
        dequantizing the largest."""
        slow = [
            m
            for m in self.bundle.space.matrices
            if exact_as_fp32(config[m.name].bits, self.accuracy_level)
        ]
        if not slow:
            return None
        packed = sum(
            prepacked_bytes(config[m.name], m.out_features, m.in_features)
            for m in self.bundle.space.matrices
            if m not in slow
        )
        fp32 = [4 * m.n_params for m in slow]
        return packed + EXACT_FP32_COPIES * sum(fp32) + max(fp32)
