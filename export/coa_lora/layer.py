"""``QuantLoRALinear``: a frozen linear run at a quantization option, plus a shared LoRA branch.

    y = x W_q^T + b + s * ((x A^T) (I + U)^T) B^T          ΔW = s B (I + U) A

With ``low_rank`` > 0 a second pair (A_low [r_low, in], B_low [out, r_low]) of its own adds
s * B_low A_low when the layer runs an option at ``low_bits`` (the space's lowest bit-width):
capacity for the quantization error where it is largest, which the other options never run.

``W_q`` is the weight after ``coalora.export.quantizers`` (the same quantizer the bundle
writer uses) and dequantization, i.e. exactly what the device's kernel multiplies by. Each
option's dequantized weight is computed once and cached (in the base's dtype, on its device),
so switching configuration between steps costs nothing. ``U`` comes from θ (set by the model);
``None`` means U = 0.

For models whose dequantized weights do not all fit, ``remember(..., packed=True)`` keeps
every option's packed codes and ``drop_weight`` frees the full-precision weight: a dequantized
weight is then rebuilt from the codes when a configuration needs it, and the model drops the
ones no step needs.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from coalora.export.quantizers import Hessian, quantize_matrix
from coalora.kernels.matmulnbits import MatMulNBitsWeights, from_matmulnbits, to_matmulnbits
from coalora.kernels.options import QuantOption
from coalora.kernels.quantize import QuantizedMatrix

Mode = Literal["quant", "fp", "no-lora", "fp-no-lora"]
MODES: tuple[str, ...] = ("quant", "fp", "no-lora", "fp-no-lora")


class QuantLoRALinear(nn.Module):
    """Replaces an ``nn.Linear``; the base weight and bias stay frozen.

    Modes: ``quant`` (quantized base + LoRA, the default), ``fp`` (full-precision base + LoRA:
    the upper bound), ``no-lora`` (quantized base alone), ``fp-no-lora`` (the original layer).
    """

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        *,
        importance: np.ndarray | None = None,
        method: str = "search",  # "gptq" needs ``hessian``
        hessian: Hessian | None = None,
        low_rank: int = 0,
        low_bits: int | None = None,
    ) -> None:
        super().__init__()
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.rank = rank
        self.scaling = alpha / rank
        self.weight: nn.Parameter | None = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.base_dtype = base.weight.dtype
        self.bias = (
            None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        )
        dev = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=dev))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=dev))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear / PEFT
        if low_rank > 0 and low_bits is None:
            raise ValueError("a low-bit pair needs low_bits, the bit-width that runs it")
        self.low_bits = low_bits
        self.lora_A_low: nn.Parameter | None = None
        self.lora_B_low: nn.Parameter | None = None
        if low_rank > 0:
            self.lora_A_low = nn.Parameter(torch.empty(low_rank, self.in_features, device=dev))
            self.lora_B_low = nn.Parameter(torch.zeros(self.out_features, low_rank, device=dev))
            nn.init.kaiming_uniform_(self.lora_A_low, a=math.sqrt(5))
        self.importance = None if importance is None else np.asarray(importance, np.float32)
        self.method = method
        self.hessian = hessian  # E[x x^T] of the input, for the gptq quantizer
        self.option: QuantOption | None = None
        self.mode: Mode = "quant"
        self.U: torch.Tensor | None = None
        # Not buffers: they are derived from ``weight`` and never belong in a checkpoint.
        self._cache: dict[QuantOption, torch.Tensor] = {}
        self._codes: dict[QuantOption, MatMulNBitsWeights] = {}  # with ``keep_codes``

    def extra_repr(self) -> str:
        low = "" if self.lora_A_low is None else f", r_low={self.lora_A_low.shape[0]}"
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.rank}{low}, "
            f"s={self.scaling:g}, option={self.option}, mode={self.mode}"
        )

    def lora_pairs(self) -> dict[str, nn.Parameter]:
        """The trained pairs by name: lora_A, lora_B and, with a low-bit pair, its two."""
        pairs = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        if self.lora_A_low is not None and self.lora_B_low is not None:
            pairs.update(lora_A_low=self.lora_A_low, lora_B_low=self.lora_B_low)
        return pairs

    def runs_low_pair(self, option: QuantOption | None = None) -> bool:
        """Whether ``option`` (default: the layer's) runs the low-bit pair."""
        option = self.option if option is None else option
        return self.lora_A_low is not None and option is not None and option.bits == self.low_bits

    # -- quantized weights ----------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.lora_A.device  # the LoRA stays when the fp weight is dropped

    def quantize(self, option: QuantOption) -> QuantizedMatrix:
        """The codes the bundle ships for ``option``, quantized once and kept packed.

        The residual init, the cost table and the bundle all ask for the same codes; with
        gptq, quantizing them again took 143 s of SmolLM2's 529 s demo export. Packed codes
        cost about (bits + scales) / 8 bytes a weight (190 MB for SmolLM2's three options)."""
        codes = self._codes.get(option)
        if codes is not None:
            return from_matmulnbits(codes)
        if self.weight is None:
            raise RuntimeError(f"option {option} was not kept when the fp weight was dropped")
        w_np = self.weight.detach().float().cpu().numpy()
        q = quantize_matrix(
            w_np, option, self.method, importance=self.importance, hessian=self.hessian
        )
        self._codes[option] = to_matmulnbits(q)
        return q

    def remember(self, option: QuantOption, q: QuantizedMatrix, *, packed: bool) -> None:
        """Keep ``q`` (``option``'s codes) for training: ``packed`` codes, about (bits +
        scales) / 8 bytes a weight, when the fp weight is to go; else the dequantized weight."""
        if packed:
            self._codes[option] = to_matmulnbits(q)
        else:
            self._cache[option] = self._on_device(torch.from_numpy(q.dequantize()))

    def drop_weight(self) -> None:
        """Free the fp weight and the dequantized cache; the kept codes stay."""
        self._cache.clear()
        self.weight = None

    def _on_device(self, w: torch.Tensor) -> torch.Tensor:
        # the forward multiplies in the base's dtype anyway; caching in it halves bf16 caches
        return w.to(device=self.device, dtype=self.base_dtype)

    def quantized_weight(self, option: QuantOption) -> torch.Tensor:
        """Dequantized weight for ``option`` in the base's dtype, on the layer's device
        (quantized, or unpacked from the kept codes, on first use, then cached)."""
        w = self._cache.get(option)
        if w is None:
            w = torch.from_numpy(self.quantize(option).dequantize())
        w = self._on_device(w)  # no copy unless the model moved after quantizing
        self._cache[option] = w
        return w

    def drop_cache(self, keep: set[QuantOption] | None = None) -> None:
        """Free cached options (all of them, or all but ``keep``)."""
        for opt in list(self._cache):
            if keep is None or opt not in keep:
                del self._cache[opt]

    @property
    def cached_options(self) -> tuple[QuantOption, ...]:
        return tuple(self._cache)

    # -- forward ----------------------------------------------------------------------------------
    def base_weight(self) -> torch.Tensor:
        if self.mode in ("fp", "fp-no-lora"):
            if self.weight is None:
                raise RuntimeError(
                    "full-precision modes need the fp weights, dropped by layer-at-a-time "
                    "quantization (--layerwise off keeps them)"
                )
            return self.weight
        if self.option is None:
            raise RuntimeError("no quantization option set: call set_configuration first")
        return self.quantized_weight(self.option)

    def lora_delta(self, x: torch.Tensor) -> torch.Tensor:
        """s * ((x A^T)(I + U)^T) B^T, plus s * (x A_low^T) B_low^T at the low bit-width."""
        dtype, x = x.dtype, x.to(self.lora_A.dtype)
        h = F.linear(x, self.lora_A)
        if self.U is not None:
            h = h + F.linear(h, self.U.to(h.dtype))
        y = F.linear(h, self.lora_B)
        if self.mode == "quant" and self.runs_low_pair():  # no quantization error in fp
            y = y + F.linear(F.linear(x, self.lora_A_low), self.lora_B_low)
        return (self.scaling * y).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.base_weight()
        y = F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if self.mode in ("quant", "fp"):
            y = y + self.lora_delta(x)
        return y

    @torch.no_grad()
    def folded_A(self, U: torch.Tensor | None = None) -> torch.Tensor:
        """A' = (I + U) A: with it the adapter is a plain LoRA pair (A', B, s)."""
        U = self.U if U is None else U
        A = self.lora_A.detach()
        return A if U is None else A + U.detach().to(A.dtype) @ A

    @torch.no_grad()
    def folded_pair(
        self, option: QuantOption, U: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(A', B) of the plain LoRA that ``option`` runs: rank r, or r + r_low with the
        low-bit pair stacked under it when ``option`` is at the low bit-width."""
        A, B = self.folded_A(U), self.lora_B.detach()
        if self.runs_low_pair(option):
            A = torch.cat([A, self.lora_A_low.detach()], dim=0)
            B = torch.cat([B, self.lora_B_low.detach()], dim=1)
        return A, B
