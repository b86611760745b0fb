"""``CoALoRAConfig``: the adapter's shape and how it is trained."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from coalora.export.options import default_of

LORA_INITS: tuple[str, ...] = ("zero", "residual", "residual-theta")
SAMPLERS: tuple[str, ...] = ("uniform", "sandwich", "floor")
THETA_ANCHORS: tuple[str, ...] = ("none", "floor")


@dataclass
class CoALoRAConfig:
    """Hyper-parameters of one CoA-LoRA adapter.

    ``use_theta=False`` gives the Shared-LoRA baseline (one A, B for every configuration, U = 0);
    per-configuration LoRA is the same model trained on a single configuration. The fields
    an export run sets (rank, alpha, lr, configs_per_step, seed) default to ``ExportOptions``'
    (written once, in ``export/options.py``), so a config built by hand trains as an export does.
    """

    # adapter
    rank: int = default_of("rank")
    alpha: float = default_of("alpha")
    # configuration-aware network θ
    use_theta: bool = True
    theta_hidden: int = 128
    theta_embed_dim: int = 8
    use_global_feature: bool = True
    theta_init_std: float = 1e-3  # last layer near zero so U starts ~0 (plain LoRA)
    # which linears get an adapter (matrix module types, see
    # ``coalora.runtime.format.theta.matrix_role``)
    target_modules: tuple[str, ...] = ("q", "k", "v", "o", "gate", "up", "down")
    # parameter names of the base model that are trained too (classifier heads)
    trainable_base: tuple[str, ...] = ("classifier", "score")
    # training
    configs_per_step: int = default_of("configs_per_step")
    lr: float = default_of("lr")
    theta_lr_scale: float = default_of("theta_lr_scale")  # θ's lr = lr * this
    # "floor": U(c) = θ(c) - θ(floor), the floor being the cheapest configuration of the
    # starting training set, which then runs the shared LoRA alone (``CoALoRAModel.anchor``)
    theta_anchor: str = default_of("theta_anchor")
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decay floor, as a fraction of ``lr``
    seed: int = default_of("seed")
    # quality levers (each measured in benchmarks/results/quality_ablation.md when run)
    # how a step picks its configurations: "uniform", "sandwich" or "floor" (``sampling``)
    sampler: str = default_of("sampler")
    # LoRA start: "zero" (B = 0) or "residual" (top-r SVD of W - Q(W) at ``lora_init_option``,
    # default the cheapest option of the space; ``init``), or "residual-theta" (that, with θ
    # fitted so each option's U starts at the projection of its own residual; ``init``)
    lora_init: str = default_of("lora_init")
    lora_init_option: str | None = None
    # loss = (1 - w) * cross-entropy + w * KL(shipped weights' top-k || student) (``distill``)
    distill_weight: float = default_of("distill_weight")
    distill_topk: int = 32
    # extra rank for the matrices at the space's lowest bit-width, in a pair of its own that
    # only those run (``layer``); 0: none
    low_bit_rank: int = default_of("low_bit_rank")

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"rank must be >= 1, got {self.rank}")
        if self.configs_per_step < 1:
            raise ValueError(f"configs_per_step must be >= 1, got {self.configs_per_step}")
        if self.lr <= 0 or self.theta_lr_scale <= 0:
            raise ValueError(f"lr and theta_lr_scale must be positive, got {self.lr}")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {', '.join(SAMPLERS)}, got {self.sampler!r}")
        if self.theta_anchor not in THETA_ANCHORS:
            raise ValueError(
                f"theta_anchor must be one of {', '.join(THETA_ANCHORS)}, got {self.theta_anchor!r}"
            )
        if self.theta_anchor != "none" and self.lora_init == "residual-theta":
            # that init fits θ(c) itself to each option's residual, not θ(c) - θ(floor)
            raise ValueError("theta_anchor and lora_init 'residual-theta' do not combine")
        if self.lora_init not in LORA_INITS:
            raise ValueError(
                f"lora_init must be one of {', '.join(LORA_INITS)}, got {self.lora_init!r}"
            )
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ValueError(f"distill_weight must be in [0, 1], got {self.distill_weight}")
        if self.low_bit_rank < 0:
            raise ValueError(f"low_bit_rank must be >= 0, got {self.low_bit_rank}")
        if self.distill_topk < 1:
            raise ValueError(f"distill_topk must be >= 1, got {self.distill_topk}")
        self.target_modules = tuple(self.target_modules)
        self.trainable_base = tuple(self.trainable_base)
        self.betas = (float(self.betas[0]), float(self.betas[1]))

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    @property
    def starts_from_residual(self) -> bool:
        """(A, B) start at the quantization residual's SVD ("residual", "residual-theta")."""
        return self.lora_init != "zero"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, tuple):
                d[k] = list(v)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CoALoRAConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown CoALoRAConfig field(s): {', '.join(unknown)}")
        kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**kwargs)
