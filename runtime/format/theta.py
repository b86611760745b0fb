"""θ's input vocabulary and the roles of quantized matrices, shared by exporter and device.

θ (trained on the workstation, run on the device as ONNX) takes, per quantized matrix, the
index of its bit-width, block size, block (layer) index and module type, plus one float for
the whole configuration (its average bits, normalised). ``ThetaVocab`` defines that encoding
and is stored in the bundle, so both sides build exactly the same arrays. Numpy only.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from coalora.kernels.config import ConfigSpace
from coalora.kernels.options import QuantOption
from coalora.runtime.format.spec import FAMILIES, MODULE_TYPES

# Suffix of a matrix name -> module type, family by family (spec.FAMILIES).
_MODULE_TYPES: tuple[tuple[str, str], ...] = tuple(m for f in FAMILIES for m in f.modules)

# The block index: the number after the last "layers"/"layer"/"h"/"blocks" component.
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")


def matrix_role(name: str) -> tuple[int, str]:
    """(block index, module type) of a quantized matrix, e.g.
    ``model.layers.12.self_attn.q_proj`` -> (12, "q"),
    ``bert.encoder.layer.3.attention.self.query`` -> (3, "q")."""
    base = name.removesuffix(".weight")
    layer = _LAYER_RE.findall(base)
    if not layer:
        raise ValueError(f"matrix {name!r} has no block index (expected e.g. 'layers.3.')")
    for suffix, module in _MODULE_TYPES:
        if base == suffix or base.endswith("." + suffix):
            return int(layer[-1]), module
    raise ValueError(
        f"matrix {name!r} is not an attention or MLP projection coalora quantizes "
        "(q/k/v/o/gate/up/down)"
    )


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
