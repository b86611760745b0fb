"""The memory plan of a configuration: what the whole process holds when it serves it.

A byte budget ("600MB") covers the whole process, so a configuration fits only if all of
these do (see the design's "Quantization configuration"):

- quantized weights: codes + scales + zero points, exactly as MatMulNBits holds them
- other weights: embeddings, norms, the LM head (a given number from the bundle)
- the LoRA side branch: A' and B for every matrix
- the KV cache at the full context length
- the runtime itself (``DEFAULT_OVERHEAD``)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from coalora.kernels.config import ConfigSpace
from coalora.kernels.options import QuantOption

DEFAULT_OVERHEAD = 64 * 2**20
"""Resident memory of the runtime before any model weights: 64 MiB (67.1 MB).

Measured on the 2-core x86-64 machine (Python 3.11, numpy, onnxruntime 1.32, psutil 7.2) as
``psutil.Process().memory_info().rss`` in a fresh interpreter after ``import numpy,
onnxruntime``, creating an ``InferenceSession`` for a one-node (Relu) model with
``intra_op_num_threads=2`` and running it once: 60.0 MB (57.2 MiB), the same over five runs.
With the CLI's other imports (tokenizers, safetensors, typer, rich) it is 66.9 MB (63.8 MiB),
so 64 MiB is that figure rounded up. A bare interpreter with psutil is 13.9 MB of it.
Allocator arenas and activations of a real model are not included (the KV cache is planned
separately).
"""


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes the process holds when serving one configuration."""

    quantized_weights_bytes: int
    other_weights_bytes: int
    lora_bytes: int
    kv_cache_bytes: int
    runtime_overhead_bytes: int

    @property
    def total(self) -> int:
        return (
            self.quantized_weights_bytes
            + self.other_weights_bytes
            + self.lora_bytes
            + self.kv_cache_bytes
            + self.runtime_overhead_bytes
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "quantized_weights_bytes": self.quantized_weights_bytes,
            "other_weights_bytes": self.other_weights_bytes,
            "lora_bytes": self.lora_bytes,
            "kv_cache_bytes": self.kv_cache_bytes,
            "runtime_overhead_bytes": self.runtime_overhead_bytes,
            "total": self.total,
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
) -> MemoryPlan:
    """The plan for ``config``; the KV cache is sized for the full ``context_length``.

    An encoder (classification) passes ``kv_bytes_per_token=0``.
    """
    for name, value in (
        ("other_weights_bytes", other_weights_bytes),
        ("lora_bytes", lora_bytes),
        ("kv_bytes_per_token", kv_bytes_per_token),
        ("context_length", context_length),
        ("overhead_bytes", overhead_bytes),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    return MemoryPlan(
        quantized_weights_bytes=space.nbytes(config),
        other_weights_bytes=int(other_weights_bytes),
        lora_bytes=int(lora_bytes),
        kv_cache_bytes=int(kv_bytes_per_token) * int(context_length),
        runtime_overhead_bytes=int(overhead_bytes),
    )
