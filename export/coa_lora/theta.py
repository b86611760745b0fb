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

from collections.abc import Mapping

import numpy as np
import torch
from torch import nn

from coalora.runtime.format.theta import ThetaVocab


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
