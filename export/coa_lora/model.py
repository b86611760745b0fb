"""``CoALoRAModel``: a Hugging Face model with quantization-aware shared LoRA and θ.

Every matrix of the configuration space is swapped for a ``QuantLoRALinear``; θ produces U for
all of them in one call per configuration. The base model stays frozen except its task head
(``CoALoRAConfig.trainable_base``, e.g. a sequence classifier's ``classifier``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from coalora.export.coa_lora.config import CoALoRAConfig
from coalora.export.coa_lora.layer import MODES, Mode, QuantLoRALinear
from coalora.export.coa_lora.theta import ConfigTheta, ThetaVocab
from coalora.export.memory import release_freed
from coalora.export.models import config_space
from coalora.export.quantizers import Hessian
from coalora.kernels.config import ConfigSpace, Configuration
from coalora.kernels.options import QuantOption
from coalora.kernels.quantize import QuantizedMatrix
from coalora.runtime.format.theta import matrix_role

Adapter = dict[str, tuple[np.ndarray, np.ndarray, float]]


class CoALoRAModel(nn.Module):
    """Wraps ``base`` (causal LM or sequence classifier); ``kind`` is "causal-lm" or "encoder"."""

    def __init__(
        self,
        base: nn.Module,
        space: ConfigSpace,
        config: CoALoRAConfig | None = None,
        *,
        kind: str = "causal-lm",
        importance: Mapping[str, np.ndarray] | None = None,
        method: str = "search",  # needs no Hessian; the export picks its own (ExportOptions)
        vocab: ThetaVocab | None = None,
        hessians: Mapping[str, Hessian] | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("causal-lm", "encoder"):
            raise ValueError(f"kind must be 'causal-lm' or 'encoder', got {kind!r}")
        self.cfg = config or CoALoRAConfig()
        self.kind = kind
        self.space = space
        self.base = base
        self.freeze_base()

        self._roles = {m.name: matrix_role(m.name) for m in space.matrices}
        # A's and θ's initial values depend on the adapter's seed alone, not on global RNG state.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.cfg.seed)
            self._build(space, importance, method, vocab, hessians)
            if self.cfg.starts_from_residual:
                from coalora.export.coa_lora import init

                init.residual_init(self, init.init_option(self, self.cfg.lora_init_option))
                if self.cfg.lora_init == "residual-theta" and self.theta is not None:
                    before, after = init.fit_theta_to_residuals(self)
                    init.log.info(
                        "θ fitted to each option's residual: weighted error %.3f -> %.3f of U = 0",
                        before,
                        after,
                    )
        self.configuration: Configuration | None = None
        # With ``cfg.theta_anchor == "floor"``: the configuration whose U is zero (``anchor_at``)
        self.anchor: Configuration | None = None
        self.mode: Mode = "quant"
        # True once ``quantize_layers(layerwise=True)`` dropped the fp weights: the dequantized
        # cache then holds only what the current configurations use (``retain``).
        self.layerwise = False

    def _build(
        self,
        space: ConfigSpace,
        importance: Mapping[str, np.ndarray] | None,
        method: str,
        vocab: ThetaVocab | None,
        hessians: Mapping[str, Hessian] | None = None,
    ) -> None:
        linears: dict[str, tuple[nn.Module, str, nn.Linear]] = {}
        for m in space.matrices:
            parent_name, _, child = m.name.rpartition(".")
            parent = self.base.get_submodule(parent_name) if parent_name else self.base
            lin = getattr(parent, child, None)
            if not isinstance(lin, nn.Linear):
                raise TypeError(f"{m.name!r} is {type(lin).__name__}, expected nn.Linear")
            linears[m.name] = (parent, child, lin)
        # Check every shape before touching the model, so a mismatch leaves it intact.
        space.check_shapes({n: tuple(lin.weight.shape) for n, (_, _, lin) in linears.items()})
        self.layers: dict[str, QuantLoRALinear] = {}
        self.low_bits = min(o.bits for o in space.options)  # the low-bit pair's bit-width
        for name, (parent, child, lin) in linears.items():
            layer = QuantLoRALinear(
                lin,
                self.cfg.rank,
                self.cfg.alpha,
                importance=None if importance is None else importance.get(name),
                method=method,
                hessian=None if hessians is None else hessians.get(name),
                low_rank=self.cfg.low_bit_rank,
                low_bits=self.low_bits,
            )
            if self._roles[name][1] not in self.cfg.target_modules:
                layer.mode = "no-lora"
                for p in layer.lora_pairs().values():
                    p.requires_grad_(False)
            setattr(parent, child, layer)
            self.layers[name] = layer
        self.adapted = [n for n, la in self.layers.items() if la.lora_A.requires_grad]

        depth = getattr(getattr(self.base, "config", None), "num_hidden_layers", None)
        self.vocab = vocab or ThetaVocab.from_space(space, n_layers=depth, role=self._role)
        self.theta: ConfigTheta | None = None
        if self.cfg.use_theta:
            self.theta = ConfigTheta(
                self.vocab,
                self.cfg.rank,
                hidden=self.cfg.theta_hidden,
                embed_dim=self.cfg.theta_embed_dim,
                use_global_feature=self.cfg.use_global_feature,
                init_std=self.cfg.theta_init_std,
            ).to(self.device)

    @classmethod
    def from_loaded(
        cls,
        loaded: Any,
        config: CoALoRAConfig | None = None,
        space: ConfigSpace | None = None,
        **kw,
    ) -> CoALoRAModel:
        """Build from ``export.models.load_model``'s ``LoadedModel``."""
        if space is None:
            space = config_space(loaded.model)
        return cls(loaded.model, space, config, kind=loaded.kind, **kw)

    def _role(self, name: str) -> tuple[int | None, str]:
        return self._roles[name]

    @property
    def device(self) -> torch.device:
        return next(self.base.parameters()).device

    # -- freezing and trainables ------------------------------------------------------------
    def freeze_base(self) -> None:
        """Freeze every base weight except the task head named in ``trainable_base``."""
        for name, p in self.base.named_parameters():
            if "lora_" in name:
                continue
            p.requires_grad_(any(part in name.split(".") for part in self.cfg.trainable_base))

    def trainable_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters().values())

    # -- configuration ----------------------------------------------------------------------
    def set_mode(self, mode: Mode) -> None:
        """``quant`` | ``fp`` (fp base + LoRA) | ``no-lora`` | ``fp-no-lora``."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        self.mode = mode
        for name, layer in self.layers.items():
            has_lora = name in self.adapted
            layer.mode = (
                mode if has_lora else ("fp-no-lora" if mode.startswith("fp") else "no-lora")
            )

    def encode(self, config: Mapping[str, QuantOption]) -> dict[str, np.ndarray]:
        return self.vocab.encode(config, self.space, role=self._role)

    def anchor_at(self, configs: Iterable[Configuration]) -> None:
        """Fix the anchor to the cheapest of ``configs`` (the starting training set), once:
        a set the search changes later keeps the anchor θ trained against."""
        if self.cfg.theta_anchor == "floor" and self.theta is not None and self.anchor is None:
            self.anchor = min(configs, key=self.space.bits)

    def raw_U(self, config: Mapping[str, QuantOption]) -> torch.Tensor:
        """θ's own output for ``config`` (space order): [n, r, r]."""
        assert self.theta is not None
        return self.theta.forward_arrays(self.encode(config))

    def compute_U(self, config: Mapping[str, QuantOption]) -> torch.Tensor | None:
        """U for every matrix (space order): [n, r, r], θ(config), less θ(anchor) when
        anchored (the anchor then runs the shared LoRA alone); ``None`` for Shared-LoRA."""
        if self.theta is None:
            return None
        U = self.raw_U(config)
        if self.anchor is not None:
            U = U - self.raw_U(self.anchor)
        return U

    def set_configuration(self, config: Mapping[str, QuantOption | str]) -> Configuration:
        """Set every layer's option and U = θ(config). Under grad mode U keeps θ's graph."""
        config = self.space.validate(config)
        options = dict(config.items())  # O(1) lookups; Configuration's are linear
        U = self.compute_U(options)
        Us = [None] * len(self.space) if U is None else U.unbind(0)
        for m, u in zip(self.space.matrices, Us, strict=True):
            layer = self.layers[m.name]
            layer.option = options[m.name]
            layer.U = u
        self.configuration = config
        return config

    def prepare(
        self, options: Iterable[QuantOption] | None = None, *, progress: bool = True
    ) -> None:
        """Quantize every matrix for ``options`` now (default: the space's options)."""
        options = tuple(options or self.space.options)
        total = len(self.layers) * len(options)
        with tqdm(total=total, desc="quantize", disable=not progress) as bar:
            for layer in self.layers.values():
                for opt in options:
                    layer.quantized_weight(opt)
                    bar.update()

    def quantize_layers(
        self,
        options: Iterable[QuantOption] | None = None,
        *,
        layerwise: bool = False,
        visit: Callable[[str, QuantOption, QuantizedMatrix], None] | None = None,
        progress: bool = True,
    ) -> None:
        """Quantize every matrix for ``options`` (default: the space's), one layer at a time,
        calling ``visit(name, option, codes)`` while the layer's fp weight is still there.

        ``layerwise``: keep only each option's packed codes and drop the layer's fp weight
        before the next one, so the fp weights and every option's dequantized weights are
        never all in memory; training then rebuilds the options its configurations use."""
        options = tuple(options or self.space.options)
        total = len(self.layers) * len(options)
        with tqdm(total=total, desc="quantize", unit="q", disable=not progress, leave=False) as bar:
            for name, layer in self.layers.items():
                for opt in options:
                    q = layer.quantize(opt)
                    if visit is not None:
                        visit(name, opt, q)
                    layer.remember(opt, q, packed=layerwise)
                    bar.update()
                if layerwise:
                    layer.drop_weight()
                    release_freed()
        self.layerwise = self.layerwise or layerwise

    def retain(self, configs: Iterable[Mapping[str, QuantOption]]) -> None:
        """With layer-at-a-time quantization, free every dequantized weight ``configs`` do not
        use (the next step's or evaluation's configurations); a no-op otherwise."""
        if not self.layerwise:
            return
        configs = list(configs)
        for name, layer in self.layers.items():
            layer.drop_cache({c[name] for c in configs})
        release_freed()

    def drop_cache(self, keep: Iterable[QuantOption] | None = None) -> None:
        keep_set = None if keep is None else set(keep)
        for layer in self.layers.values():
            layer.drop_cache(keep_set)

    def forward(self, **batch: torch.Tensor) -> Any:
        return self.base(**batch)

    # -- export -------------------------------------------------------------------------------
    @torch.no_grad()
    def adapter_for(self, config: Mapping[str, QuantOption | str]) -> Adapter:
        """Plain LoRA for ``config``: name -> (A' = (I+U)A [r, in], B [out, r], s), numpy
        (rank r + r_low where ``config`` runs a matrix's low-bit pair)."""
        config = self.space.validate(config)
        options = dict(config.items())
        U = self.compute_U(options)
        out: Adapter = {}
        for i, m in enumerate(self.space.matrices):
            if m.name not in self.adapted:
                continue
            layer = self.layers[m.name]
            A, B = layer.folded_pair(options[m.name], None if U is None else U[i])
            out[m.name] = (A.float().cpu().numpy(), B.float().cpu().numpy(), float(layer.scaling))
        return out

    # -- state ----------------------------------------------------------------------------
    def lora_state_dict(self) -> dict[str, torch.Tensor]:
        """``<matrix>.lora_A`` [r, in] and ``<matrix>.lora_B`` [out, r] per adapted matrix
        (and ``lora_A_low`` / ``lora_B_low`` with a low-bit pair)."""
        return {
            f"{name}.{key}": p.detach().contiguous()
            for name in self.adapted
            for key, p in self.layers[name].lora_pairs().items()
        }

    def theta_state_dict(self) -> dict[str, torch.Tensor]:
        if self.theta is None:
            return {}
        return {k: v.detach().contiguous() for k, v in self.theta.state_dict().items()}

    def head_state_dict(self) -> dict[str, torch.Tensor]:
        """Trained base parameters (task head), by their name in the base model."""
        return {
            n: p.detach().contiguous()
            for n, p in self.base.named_parameters()
            if p.requires_grad and "lora_" not in n
        }

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {f"lora.{k}": v for k, v in self.lora_state_dict().items()}
        sd.update({f"theta.{k}": v for k, v in self.theta_state_dict().items()})
        sd.update({f"head.{k}": v for k, v in self.head_state_dict().items()})
        return sd

    def load_trainable_state_dict(self, sd: Mapping[str, torch.Tensor]) -> None:
        expected = set(self.trainable_state_dict())
        missing, extra = sorted(expected - set(sd)), sorted(set(sd) - expected)
        if missing or extra:
            raise ValueError(
                f"adapter state mismatch: missing {missing[:3]}, unexpected {extra[:3]}"
            )
        with torch.no_grad():
            for name in self.adapted:
                for key, p in self.layers[name].lora_pairs().items():
                    p.copy_(sd[f"lora.{name}.{key}"])
            if self.theta is not None:
                self.theta.load_state_dict(
                    {k[6:]: v for k, v in sd.items() if k.startswith("theta.")}
                )
            params = dict(self.base.named_parameters())
            for k, v in sd.items():
                if k.startswith("head."):
                    params[k[5:]].copy_(v)

    def metadata(self) -> dict[str, str]:
        return {
            "format": "coalora-adapter/1",
            "kind": self.kind,
            "config": json.dumps(self.cfg.to_dict()),
            "vocab": json.dumps(self.vocab.to_dict()),
            "space": json.dumps(self.space.to_dict()),
            "anchor": json.dumps(None if self.anchor is None else self.anchor.to_dict()),
        }

    def save_adapter(self, path: str | Path) -> None:
        """LoRA A/B, θ and head in one safetensors file; configs as JSON metadata."""
        cpu = {k: v.cpu() for k, v in self.trainable_state_dict().items()}  # from any device
        save_file(cpu, str(path), metadata=self.metadata())

    def load_adapter(self, path: str | Path) -> None:
        self.load_trainable_state_dict(load_file(str(path), device=str(self.device)))
        with safe_open(str(path), framework="pt") as f:
            anchor = json.loads((f.metadata() or {}).get("anchor", "null"))
        self.anchor = None if anchor is None else self.space.config_from_dict(anchor)
