"""Memory for big models: whether to quantize one layer at a time, and the process's peak RSS.

Training caches every option's dequantized weight in the base's dtype, so that switching
configurations costs nothing: for SmolLM2 (106 M quantized weights, nine options, fp32) that
is 3.8 GB beside a 0.5 GB model, for a 1.5 B model about 50 GB. Layer-at-a-time quantization
(``CoALoRAModel.quantize_layers(layerwise=True)``) keeps instead each option's packed codes,
(bits + scales) / 8 bytes a weight, drops the fp weights, and rebuilds only the options the
current step's configurations use.
"""

from __future__ import annotations

import os
import resource
from typing import Any

import torch

# Share of the free memory the caches may take before the layer-at-a-time path is chosen.
FIT_FRACTION = 0.8


def cache_bytes(model: Any) -> int:
    """Every option's dequantized weights of every quantized matrix, in the base's dtype."""
    total = 0
    for layer in model.layers.values():
        size = torch.empty((), dtype=layer.base_dtype).element_size()
        total += layer.in_features * layer.out_features * size
    return total * len(model.space.options)


def free_bytes(device: torch.device) -> int:
    """Free memory on ``device`` for this process: a GPU's free memory, or the host's
    available RAM shared by the ranks on this host."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return int(psutil.virtual_memory().available) // max(ranks_here, 1)


def use_layerwise(setting: str, model: Any, device: torch.device) -> bool:
    """``on`` / ``off`` as given; ``auto``: on where the caches would not fit in free memory."""
    if setting in ("on", "off"):
        return setting == "on"
    return cache_bytes(model) > FIT_FRACTION * free_bytes(device)


def release_freed() -> None:
    """Hand freed heap memory back to the OS (glibc's ``malloc_trim``; elsewhere nothing).

    Dropped fp weights and dequantized options are freed into the heap, where glibc keeps
    them for reuse: without this the process's RSS never falls as layers give up their
    weights, and every step's options come on top."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        trim = getattr(libc, "malloc_trim", None)
    except OSError:
        trim = None
    if trim is not None:
        trim(0)


def peak_rss_bytes(children: bool = False) -> int:
    """This process's peak resident set (or its waited-for children's largest), in bytes."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return int(resource.getrusage(who).ru_maxrss) * 1024  # Linux reports KiB
