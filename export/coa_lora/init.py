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

That start suits the cheapest option only: on a layer a configuration gives more bits, the
cheapest option's residual is the wrong correction. ``residual-theta`` also fits θ so that
each option's U starts at the least-squares projection of that option's own residual onto
the shared pair (``fit_theta_to_residuals``):
    M_o = argmin_M || (s B M A - R_o) diag(d) ||_F = (1/s) B^+ R_o diag(d) (A diag(d))^+,
    U_o = M_o - I   (U = 0 at the cheapest option, and never worse than B = 0 on any option),
weighted by the singular values, since || s B dU A diag(d) ||_F^2 = sum_ij S_i S_j dU_ij^2.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from coalora.kernels.options import QuantOption

log = logging.getLogger("coalora.export.pipeline")

if TYPE_CHECKING:
    from coalora.export.coa_lora.layer import QuantLoRALinear
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


def input_weights(layer: QuantLoRALinear) -> torch.Tensor:
    """d_k = sqrt(E[x_k^2] / mean E[x^2]) of a layer's calibration inputs (ones without)."""
    w = layer.weight
    if layer.importance is None:
        return torch.ones(w.shape[1], dtype=torch.float32, device=w.device)
    imp = torch.as_tensor(layer.importance, dtype=torch.float32, device=w.device)
    return (imp / imp.mean().clamp_min(1e-30)).sqrt().clamp_min(1e-4)


@torch.no_grad()
def residual_init(model: CoALoRAModel, option: QuantOption) -> None:
    """Set every adapted layer's (A, B) to the weighted top-r SVD of W - Q_option(W)."""
    for name in model.adapted:
        layer = model.layers[name]
        w = layer.weight.detach().float()
        resid = w - layer.quantized_weight(option).to(w.device)
        d = input_weights(layer)
        r, s = layer.rank, layer.scaling
        u, sv, vh = torch.linalg.svd(resid * d, full_matrices=False)
        root = (sv[:r] / s).sqrt()
        layer.lora_B.copy_(u[:, :r] * root)
        layer.lora_A.copy_(root[:, None] * vh[:r] / d)
        if layer.lora_A_low is not None and layer.lora_B_low is not None:
            # the next components: where the low-bit pair runs, the start is the top r + r_low
            top = r + layer.lora_A_low.shape[0]
            root = (sv[r:top] / s).sqrt()
            k = root.shape[0]  # fewer when the matrix is narrower than r + r_low
            layer.lora_B_low[:, :k] = u[:, r:top] * root
            layer.lora_A_low[:k] = root[:, None] * vh[r:top] / d


@torch.no_grad()
def residual_projections(
    model: CoALoRAModel,
) -> dict[str, tuple[dict[QuantOption, torch.Tensor], torch.Tensor]]:
    """Per adapted matrix: each option's target U_o (r x r) and the error weights S_i S_j of
    ``residual_init``'s pair (set by it, so B^T B = (A D)(A D)^T = diag(S / s))."""
    out: dict[str, tuple[dict[QuantOption, torch.Tensor], torch.Tensor]] = {}
    for name in model.adapted:
        layer = model.layers[name]
        w = layer.weight.detach().float()
        d = input_weights(layer)
        s = layer.scaling
        b, ad = layer.lora_B.detach().float(), layer.lora_A.detach().float() * d
        b_pinv, ad_pinv = torch.linalg.pinv(b), torch.linalg.pinv(ad)
        eye = torch.eye(b.shape[1], device=w.device)
        targets = {}
        for opt in model.space.options:
            resid = (w - layer.quantized_weight(opt).to(w.device).float()) * d
            targets[opt] = (b_pinv @ resid @ ad_pinv) / s - eye
        sv = (b * b).sum(0) * s  # = S_i
        out[name] = (targets, sv[:, None] * sv[None, :])
    return out


def fit_theta_to_residuals(
    model: CoALoRAModel, steps: int = 300, configs_per_step: int = 8, lr: float = 3e-3
) -> tuple[float, float]:
    """Fit θ so that θ(config) gives every adapted matrix its option's target U (above), on
    random configurations. Returns the weighted error left, as a fraction of U = 0's, before
    and after the fit (the fraction of the per-option residual the shared pair cannot hold
    is not in it: it is out of reach of any U)."""
    from coalora.export.coa_lora.train import random_configurations

    theta = model.theta
    if theta is None:
        raise ValueError("residual-theta needs θ (use_theta)")
    targets = residual_projections(model)
    index = {m.name: i for i, m in enumerate(model.space.matrices)}
    rows = [index[n] for n in model.adapted]
    weights = torch.stack([targets[n][1] for n in model.adapted])
    configs = random_configurations(model.space, steps * configs_per_step, seed=model.cfg.seed)
    configs += [model.space.uniform(o) for o in model.space.options]

    def want(config: Any) -> torch.Tensor:
        return torch.stack([targets[n][0][config[n]] for n in model.adapted])

    def error(config: Any, grad: bool) -> torch.Tensor:  # the weighted error of θ's U
        with torch.set_grad_enabled(grad):
            u = theta.forward_arrays(model.encode(config))[rows]
            return (weights * (u - want(config)) ** 2).sum()

    def fraction(sample: list[Any]) -> float:
        with torch.no_grad():
            zero = sum(float((weights * want(c) ** 2).sum()) for c in sample)
            return sum(float(error(c, False)) for c in sample) / max(zero, 1e-30)

    check = configs[-len(model.space.options) :] + configs[:8]
    before = fraction(check)
    opt = torch.optim.Adam(theta.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    norm = float(sum((weights * want(c) ** 2).sum() for c in check)) / len(check)
    for step in range(steps):
        batch = configs[step * configs_per_step : (step + 1) * configs_per_step]
        batch += check[: len(model.space.options)]  # the uniform ones, every step
        loss = sum(error(c, True) for c in batch) / (len(batch) * max(norm, 1e-30))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return before, fraction(check)
