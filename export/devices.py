"""Where the export computes: ``--device cpu|cuda|auto`` and the base dtypes a device runs.

The device is a property of the run, never of the bundle: weights leave it as float32 numpy
arrays (codes are computed on the CPU by numpy in any case), so a bundle trained on a GPU and
one trained on a CPU from the same seed have the same manifest and Pareto structure.
"""

from __future__ import annotations

import torch

from coalora.export import distributed
from coalora.export.options import ExportError


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA where torch sees a GPU, else the CPU. Under torchrun each rank takes the
    GPU of its local rank."""
    has_cuda = torch.cuda.is_available()
    if name == "cuda" and not has_cuda:
        build = "a CPU-only build" if torch.version.cuda is None else f"CUDA {torch.version.cuda}"
        raise ExportError(f"--device cuda: torch ({build}) sees no CUDA device; use --device cpu")
    if name not in ("auto", "cpu", "cuda"):
        raise ExportError(f"unknown device {name!r}: expected cpu, cuda or auto")
    if name == "cpu" or not has_cuda:
        return torch.device("cpu")
    device = torch.device("cuda", distributed.local_rank() % torch.cuda.device_count())
    torch.cuda.set_device(device)
    return device


def check_dtype(dtype: str, device: torch.device) -> None:
    """Refuse a base dtype the device cannot compute in."""
    if device.type == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise ExportError("--dtype bfloat16: this GPU has no bfloat16; use float16 or float32")
