"""Full input Hessians H = E[x x^T] of every quantized matrix, for the GPTQ quantizer.

Collected on the calibration texts like the second moments (``export.calibration``), whose
diagonal they contain. Matrices that read the same input tensor (q/k/v of one attention, gate/up
of one MLP) are called one after the other on the very same tensor object; they are grouped
by that and share one ``Hessian`` (one accumulation, one factorisation, one copy in memory).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from coalora.export.calibration import run_inputs
from coalora.export.quantizers.gptq import DEFAULT_DAMP, Hessian

if TYPE_CHECKING:
    import torch

    from coalora.export.models import LoadedModel


def activation_hessians(
    loaded: LoadedModel,
    texts: list[str],
    max_length: int = 256,
    batch_size: int = 4,
    damp: float = DEFAULT_DAMP,
) -> dict[str, Hessian]:
    """name -> ``Hessian`` of every quantizable linear's input; shared inputs share one."""
    leader: dict[str, str] = {}  # matrix -> the first matrix that read its input
    sums: dict[str, Any] = {}
    counts: dict[str, int] = {}
    last: list[Any] = [None, None]  # (input tensor, its leader) of the previous call

    def on_input(name: str, x: torch.Tensor) -> None:
        if name not in leader:
            same = last[0] is not None and last[0] is x
            leader[name] = last[1] if same else name
        last[0], last[1] = x, leader[name]
        if leader[name] != name:
            return
        xf = x.float()
        xtx = (xf.T @ xf).double()  # one batch in float32 (fast), the running sum in float64
        sums[name] = xtx if name not in sums else sums[name] + xtx
        counts[name] = counts.get(name, 0) + x.shape[0]

    linears = run_inputs(loaded, texts, on_input, max_length, batch_size)
    last[0] = None
    out: dict[str, Hessian] = {}
    shared: dict[str, Hessian] = {}
    for name, lin in linears.items():
        lead = leader.get(name, name)
        if lead not in shared:
            if lead in sums:
                h = (sums[lead] / max(counts[lead], 1)).cpu().numpy()
            else:
                h = np.zeros((lin.in_features, lin.in_features))
            shared[lead] = Hessian(h, damp)
        out[name] = shared[lead]
    return out
