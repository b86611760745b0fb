"""θ: the configuration-aware network that maps a matrix's quantization option to U (r x r).

Per matrix, θ embeds four integer inputs (bit-width, block size, layer index, module type) and,
optionally, one float describing the whole configuration (its average bits, normalised):

    [e_bits | e_block | e_layer | e_module | W_g * g] -> LayerNorm -> Linear -> SiLU -> Linear
    -> * scale -> reshape [r, r]

All matrices go through in one batched call. The input encoding is defined by ``ThetaVocab``
(saved in the bundle), so the exporter and the device build exactly the same index arrays.
Only plain ops (Gather, LayerNorm, Gemm, SiLU, Reshape) so it exports to ONNX as is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from coalora.export.models import MODULE_TYPES, matrix_role
from coalora.kernels.config import ConfigSpace
from coalora.kernels.options import QuantOption

RoleFn = Callable[[str], tuple[int | None, str]]


@dataclass(frozen=True)
class ThetaVocab:
    """θ's input vocabulary: which values each embedding table indexes."""

    bits: tuple[int, ...]
    block_sizes: tuple[int, ...]
    module_types: tuple[str, ...]
    n_layers: int
    # The global feature is (avg_bits - center) / half_range, so the space spans about [-1, 1].
    global_center: float
    global_half_range: float

    def __post_init__(self) -> None:
        if not self.bits or not self.block_sizes or not self.module_types:
            raise ValueError("θ vocabulary needs at least one bit-width, block size, module type")
        if self.n_layers < 1:
            raise ValueError(f"θ vocabulary needs n_layers >= 1, got {self.n_layers}")
        if self.global_half_range <= 0:
            raise ValueError("θ vocabulary global_half_range must be positive")

    @classmethod
    def from_space(
        cls, space: ConfigSpace, *, n_layers: int | None = None, role: RoleFn | None = None
    ) -> ThetaVocab:
        """Vocabulary covering every option of ``space``; ``n_layers`` defaults to its depth."""
        role = role or matrix_role
        roles = [role(m.name) for m in space.matrices]
        found = {t for _, t in roles}
        # Canonical order first; a model's unknown types are appended after.
        modules = tuple(t for t in MODULE_TYPES if t in found) + tuple(
            sorted(found - set(MODULE_TYPES))
        )
        depth = 1 + max((i for i, _ in roles if i is not None), default=0)
        lo, hi = space.min_bits(), space.max_bits()
        return cls(
            bits=tuple(sorted({o.bits for o in space.options})),
            block_sizes=tuple(sorted({o.block_size for o in space.options})),
            module_types=modules,
            n_layers=max(depth, n_layers or 0),
            global_center=0.5 * (lo + hi),
            global_half_range=max(0.5 * (hi - lo), 1e-6),
        )

    def global_feature(self, avg_bits: float) -> float:
        return (avg_bits - self.global_center) / self.global_half_range

    def encode(
        self, config: Mapping[str, QuantOption], space: ConfigSpace, *, role: RoleFn | None = None
    ) -> dict[str, np.ndarray]:
        """Index arrays for ``config``, one entry per matrix in ``space.matrices`` order.

        Returns ``bits``, ``block``, ``layer``, ``module`` (int64 [n]) and ``global``
        (float32 [1]).
        """
        role = role or matrix_role
        n = len(space.matrices)
        out = {k: np.zeros(n, dtype=np.int64) for k in ("bits", "block", "layer", "module")}
        for i, m in enumerate(space.matrices):
            opt = config[m.name]
            layer, mtype = role(m.name)
            out["bits"][i] = self._index(self.bits, opt.bits, "bit-width", m.name)
            out["block"][i] = self._index(self.block_sizes, opt.block_size, "block size", m.name)
            out["module"][i] = self._index(self.module_types, mtype, "module type", m.name)
            layer = 0 if layer is None else layer
            if not 0 <= layer < self.n_layers:
                raise ValueError(
                    f"matrix {m.name!r}: layer {layer} outside θ's {self.n_layers} layers"
                )
            out["layer"][i] = layer
        out["global"] = np.array([self.global_feature(space.bits(config))], dtype=np.float32)
        return out

    def decode(self, arrays: Mapping[str, np.ndarray]) -> list[tuple[QuantOption, int, str]]:
        """Inverse of ``encode`` per matrix: (option, layer index, module type)."""
        return [
            (
                QuantOption(self.bits[int(b)], self.block_sizes[int(g)]),
                int(layer),
                self.module_types[int(t)],
            )
            for b, g, layer, t in zip(
                arrays["bits"], arrays["block"], arrays["layer"], arrays["module"], strict=True
            )
        ]

    @staticmethod
    def _index(values: tuple[Any, ...], value: Any, what: str, name: str) -> int:
        try:
            return values.index(value)
        except ValueError:
            raise ValueError(
                f"matrix {name!r}: {what} {value!r} is not in θ's vocabulary {list(values)}"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": list(self.bits),
            "block_sizes": list(self.block_sizes),
            "module_types": list(self.module_types),
            "n_layers": self.n_layers,
            "global_center": self.global_center,
            "global_half_range": self.global_half_range,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ThetaVocab:
        try:
            return cls(
                bits=tuple(int(b) for b in data["bits"]),
                block_sizes=tuple(int(b) for b in data["block_sizes"]),
                module_types=tuple(str(t) for t in data["module_types"]),
                n_layers=int(data["n_layers"]),
                global_center=float(data["global_center"]),
                global_half_range=float(data["global_half_range"]),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed θ vocabulary: {exc}") from None


class ConfigTheta(nn.Module):
    """θ batched over matrices: integer index tensors [n] (+ global feature) -> U [n, r, r]."""

    def __init__(
        self,
        vocab: ThetaVocab,
        rank: int,
        *,
        hidden: int = 128,
        embed_dim: int = 8,
        use_global_feature: bool = True,
        init_std: float = 1e-3,
    ) -> None:
        super().__init__()
        self.vocab = vocab
        self.rank = rank
        self.use_global_feature = use_global_feature
        self.bits_emb = nn.Embedding(len(vocab.bits), embed_dim)
        self.block_emb = nn.Embedding(len(vocab.block_sizes), embed_dim)
        self.layer_emb = nn.Embedding(vocab.n_layers, embed_dim)
        self.module_emb = nn.Embedding(len(vocab.module_types), embed_dim)
        self.global_proj = nn.Linear(1, embed_dim) if use_global_feature else None
        self.in_dim = embed_dim * (5 if use_global_feature else 4)
        self.norm = nn.LayerNorm(self.in_dim)
        self.fc1 = nn.Linear(self.in_dim, hidden)
        self.act = nn.SiLU()
        self.fc2 = nn.Linear(hidden, rank * rank)
        # Near-zero output layer: U ~ 0 at init, so training starts from plain shared LoRA.
        nn.init.normal_(self.fc2.weight, std=init_std)
        nn.init.zeros_(self.fc2.bias)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(
        self,
        bits: torch.Tensor,
        block: torch.Tensor,
        layer: torch.Tensor,
        module: torch.Tensor,
        global_feature: torch.Tensor | None = None,
    ) -> torch.Tensor:
        parts = [
            self.bits_emb(bits),
            self.block_emb(block),
            self.layer_emb(layer),
            self.module_emb(module),
        ]
        if self.global_proj is not None:
            if global_feature is None:
                raise ValueError("this θ uses the global feature: pass global_feature")
            g = self.global_proj(global_feature.reshape(-1, 1).to(parts[0].dtype))
            parts.append(g.expand_as(parts[0]))  # [1, d] or [n, d] -> [n, d]
        h = torch.cat(parts, dim=-1)
        u = self.fc2(self.act(self.fc1(self.norm(h)))) * self.scale
        return u.reshape(-1, self.rank, self.rank)

    def forward_arrays(self, arrays: Mapping[str, np.ndarray]) -> torch.Tensor:
        """Run θ on ``ThetaVocab.encode`` output (tensors on θ's device)."""
        dev = self.fc1.weight.device
        ints = [
            torch.as_tensor(arrays[k], device=dev) for k in ("bits", "block", "layer", "module")
        ]
        g = torch.as_tensor(arrays["global"], device=dev) if self.use_global_feature else None
        return self(*ints, g)
