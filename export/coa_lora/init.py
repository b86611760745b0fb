"""LoRA initialised from the quantization residual (LoftQ / PiSSA-like).

With B = 0 every configuration starts at its quantized weight and the adapter must learn the
whole quantization error. Instead start it at the best rank-r approximation of the residual
R = W - Q_o(W) at one option ``o`` (by default the space's cheapest: where the error is
largest and the adapter helps most), shared by every configuration; θ's U then adjusts it per
configuration on top (ΔW = s B (I + U) A, U ~ 0 at the start).

The SVD is weighted by the calibration second moments E[x_k^2] when the layer has them, so
the rank-r part removed is the one that matters at the layer's output:
    R diag(d) ~ U_r S_r V_r^T,  d_k = sqrt(E[x_k^2] / mean E[x^2]),
    B = U_r sqrt(S_r / s),  A = sqrt(S_r / s) V_r^T diag(d)^-1,
so that s B A = U_r S_r V_r^T diag(d)^-1 (s = alpha / r scales B A in the forward).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from coalora.kernels.options import QuantOption

if TYPE_CHECKING:
    from coalora.export.coa_lora.model import CoALoRAModel


def init_option(model: CoALoRAModel, name: str | None) -> QuantOption:
    """The option whose residual seeds the adapter: ``name``, else the space's cheapest."""
    options = model.space.options
    if name is None:
        return min(options, key=lambda o: (o.nominal_bits(), o.block_size))
    opt = QuantOption.parse(name)
    if opt not in options:
        raise ValueError(f"lora_init_option {opt} is not one of the space's options")
    return opt


@torch.no_grad()
def residual_init(model: CoALoRAModel, option: QuantOption) -> None:
    """Set every adapted layer's (A, B) to the weighted top-r SVD of W - Q_option(W)."""
    for name in model.adapted:
        layer = model.layers[name]
        w = layer.weight.detach().float()
        resid = w - layer.quantized_weight(option).to(w.device)
        d = torch.ones(w.shape[1], dtype=torch.float32, device=w.device)
        if layer.importance is not None:
            imp = torch.as_tensor(layer.importance, dtype=torch.float32, device=w.device)
            d = (imp / imp.mean().clamp_min(1e-30)).sqrt().clamp_min(1e-4)
        r, s = layer.rank, layer.scaling
        u, sv, vh = torch.linalg.svd(resid * d, full_matrices=False)
        root = (sv[:r] / s).sqrt()
        layer.lora_B.copy_(u[:, :r] * root)
        layer.lora_A.copy_(root[:, None] * vh[:r] / d)
