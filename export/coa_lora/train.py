"""CoA-LoRA training loop, evaluation, and resumable checkpoints.

One step: sample ``configs_per_step`` configurations from the training configuration set, run
the quantized model of each (with U = θ(config)) on the SAME batch, accumulate the gradients of
their losses, clip, and take one AdamW step over A, B, θ (and the task head).

Everything a step draws is a function of (seed, step): the batch (``batches(step)``), the
configurations and the dropout masks. A resumed run therefore repeats exactly what an
uninterrupted one would have done. Checkpoints are safetensors + JSON, never pickle.

Under a torch.distributed process group (``export.distributed``) every rank runs this loop:
each takes its rows of the step's global batch, the gradients and losses are summed over the
ranks weighted by each rank's share of the counted targets, so the step is that of one
process on the whole batch (the loss is the global batch's mean). Every rank draws the same
configurations and takes the same optimizer step; rank 0 alone writes the log and the
checkpoints, which hold nothing that depends on the number of processes: a run resumed with
another world size continues where it stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from coalora.export import distributed
from coalora.export.coa_lora.model import CoALoRAModel
from coalora.export.coa_lora.sampling import ConfigSampler
from coalora.kernels.config import ConfigSpace, Configuration

Batch = dict[str, torch.Tensor]
BatchFn = Callable[[int], Batch]
EpochCallback = Callable[[int, CoALoRAModel, list[Configuration]], Sequence[Configuration] | None]

CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainResult:
    step: int
    configs: list[Configuration]
    history: list[dict[str, Any]] = field(default_factory=list)


def get_lr(step: int, base_lr: float, total_steps: int, warmup: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to ``min_ratio * base_lr`` at ``total_steps``."""
    if warmup and step < warmup:
        return base_lr * (step + 1) / warmup
    if total_steps <= warmup:
        return base_lr
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def sample_configs(
    configs: Sequence[Configuration], k: int, seed: int, step: int
) -> list[Configuration]:
    """``min(k, len(configs))`` distinct configurations for ``step``.

    A set smaller than ``k`` is not drawn with replacement: a repeated configuration on the
    same batch adds an identical gradient, i.e. only compute (a per-configuration LoRA would
    pay twice per step for nothing).
    """
    rng = np.random.default_rng([seed, step])
    idx = rng.choice(len(configs), size=min(k, len(configs)), replace=False)
    return [configs[int(i)] for i in idx]


def random_configurations(space: ConfigSpace, n: int, seed: int = 0) -> list[Configuration]:
    """``n`` distinct random configurations whose budgets spread over the space's range.

    Each draws its own option mix (Dirichlet), then every matrix an option from that mix;
    a stand-in for ``initial_configurations`` when no cost table is at hand.
    """
    rng = np.random.default_rng(seed)
    out: dict[Configuration, None] = {}
    for _ in range(50 * n):
        if len(out) == n:
            break
        mix = rng.dirichlet(np.full(len(space.options), 0.3))
        picks = rng.choice(len(space.options), size=len(space), p=mix)
        config = Configuration(
            {m.name: space.options[int(i)] for m, i in zip(space.matrices, picks, strict=True)}
        )
        out[config] = None
    return list(out)


def initial_configurations(
    space: ConfigSpace,
    costs: Any,
    n_budgets: int = 50,
    lo: float | None = None,
    hi: float | None = None,
) -> list[Configuration]:
    """Optimal allocations (``export.allocation.allocate``) at budgets spread over [lo, hi]."""
    from coalora.export.allocation import allocate

    lo = space.min_bits() if lo is None else lo
    hi = space.max_bits() if hi is None else hi
    out: dict[Configuration, None] = {}
    for budget in np.linspace(lo, hi, n_budgets):
        out[allocate(space, costs, float(budget))] = None
    return list(out)


def make_optimizer(model: CoALoRAModel) -> torch.optim.AdamW:
    """AdamW over the trainables. With ``theta_lr_scale`` other than 1, θ gets a group of its
    own whose ``lr_scale`` the schedule multiplies in (one group otherwise, as checkpoints
    written before the lever hold)."""
    cfg = model.cfg
    named = model.trainable_parameters()
    groups: list[dict[str, Any]] = [{"params": list(named.values())}]
    theta = [p for n, p in named.items() if n.startswith("theta.")]
    if theta and cfg.theta_lr_scale != 1.0:
        rest = [p for n, p in named.items() if not n.startswith("theta.")]
        groups = [{"params": rest}, {"params": theta, "lr_scale": cfg.theta_lr_scale}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)


def counted_targets(model: CoALoRAModel, batch: Batch) -> int:
    """What the loss averages over: next-token targets (causal LM) or rows (classifier)."""
    labels = batch["labels"]
    if model.kind == "causal-lm":
        return int((labels[..., 1:] != -100).sum())
    return int(labels.shape[0])


def to_device(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device) for k, v in batch.items()}


def train_step(
    model: CoALoRAModel,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    configs: Sequence[Configuration],
    grad_clip: float = 1.0,
) -> list[float]:
    """Accumulate the losses of ``configs`` on ``batch``, clip, step. Returns each loss.

    With ``cfg.distill_weight`` > 0 the teacher's top-k runs once for the batch and every
    configuration's loss mixes cross-entropy and the KL to it (``distill``). Under a process
    group ``batch`` is the global batch: this rank computes on its rows, and the gradients and
    returned losses are those of the whole batch."""
    from coalora.export.coa_lora.distill import kl_to_teacher, teacher_topk

    batch = to_device(distributed.batch_shard(batch), model.device)
    # This rank's weight in the global mean: 1.0 in one process (x * 1.0 is exact).
    n_local = counted_targets(model, batch)
    n_global = n_local
    if distributed.world_size() > 1:
        n_global = int(distributed.all_reduce_sum(torch.tensor([float(n_local)])).item())
    share = n_local / max(n_global, 1)
    w = model.cfg.distill_weight
    cache = teacher_topk(model, batch, model.cfg.distill_topk) if w > 0 else None
    optimizer.zero_grad(set_to_none=True)
    losses = []
    for config in configs:
        model.set_configuration(config)
        out = model(**batch)
        loss = out.loss
        if cache is not None:
            kl = kl_to_teacher(out.logits, cache)
            loss = kl if w == 1.0 else (1 - w) * loss + w * kl
        loss = loss * share
        (loss / len(configs)).backward()  # frees this configuration's graph before the next
        losses.append(loss.detach().float().reshape(1))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if distributed.world_size() > 1:
        _all_reduce_grads(params, losses)
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    return [float(v) for v in torch.cat(losses).tolist()]


def _all_reduce_grads(params: list[torch.Tensor], losses: list[torch.Tensor]) -> None:
    """Sum every gradient and the per-configuration losses over the ranks in one collective.
    Parameters without a gradient stay without one (AdamW skips them), as in one process."""
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads] + [t.to(grads[0].device) for t in losses])
    distributed.all_reduce_sum(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    for t, v in zip(losses, flat[offset:].split(1), strict=True):
        t.copy_(v)


def train(
    model: CoALoRAModel,
    batches: BatchFn,
    configs: Sequence[Configuration],
    *,
    steps: int,
    out_dir: str | Path | None = None,
    steps_per_epoch: int | None = None,
    on_epoch_end: EpochCallback | None = None,
    checkpoint_every: int = 0,
    resume: bool = True,
    eval_batches: Iterable[Batch] | None = None,
    eval_configs: Sequence[Configuration] = (),
    eval_every: int = 0,
    stop_after: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` for ``steps`` steps on ``batches(step)``.

    ``configs`` is the training configuration set. With ``steps_per_epoch``, ``on_epoch_end``
    is called after every epoch but the last with (epoch, model, current set) and may return
    the next set (the Pareto search's hook). With ``out_dir`` the loop writes
    ``train_log.jsonl`` and a checkpoint every ``checkpoint_every`` steps and at the end;
    ``resume`` continues from it.
    The learning-rate schedule spans ``steps``: resume with the same ``steps``.
    ``stop_after`` ends this call early at that step (checkpointed), for time-sliced jobs.
    """
    cfg = model.cfg
    config_set = list(configs)
    if not config_set:
        raise ValueError("the training configuration set is empty")
    optimizer = make_optimizer(model)
    sampler = ConfigSampler(cfg.sampler, cfg.configs_per_step, cfg.seed, model.space)
    start = 0
    log_path = None
    main = distributed.is_main()
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path = out_dir / LOG_FILE
        ckpt = out_dir / CHECKPOINT_DIR
        if resume and (ckpt / "trainer.json").exists():
            state = load_checkpoint(ckpt, model, optimizer)
            start, config_set = state["step"], state["configs"]
            sampler.load_state(state.get("sampler", []))
        if main:
            _truncate_log(log_path, start)
    model.anchor_at(config_set)  # a resumed run's anchor came back with its adapter

    history: list[dict[str, Any]] = []
    model.train()
    end = steps if stop_after is None else min(steps, stop_after)
    bar = tqdm(
        range(start, end), initial=start, total=steps, disable=not (progress and main), desc="train"
    )
    for step in bar:
        lr = get_lr(step, cfg.lr, steps, cfg.warmup_steps, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        torch.manual_seed(cfg.seed * 1_000_003 + step)  # dropout masks depend on the step only
        chosen = sampler.sample(config_set, step)
        model.retain(chosen)  # layer-at-a-time: only this step's options stay dequantized
        t0 = time.perf_counter()
        losses = train_step(model, optimizer, batches(step), chosen, cfg.grad_clip)
        sampler.observe(chosen, losses)
        record: dict[str, Any] = {
            "step": step + 1,
            "lr": lr,
            "loss": float(np.mean(losses)),
            "losses": [
                {"bits": round(model.space.bits(c), 4), "loss": loss}
                for c, loss in zip(chosen, losses, strict=True)
            ],
            "seconds": round(time.perf_counter() - t0, 4),
            # positions in the set in force, so which configurations trained is on record
            "drawn": [config_set.index(c) for c in chosen],
        }
        done = step + 1
        if eval_every and eval_batches is not None and eval_configs and done % eval_every == 0:
            metrics = evaluate_configs(model, eval_configs, eval_batches)
            record["eval"] = [
                {"bits": round(model.space.bits(c), 4), "metric": v}
                for c, v in zip(eval_configs, metrics, strict=True)
            ]
            model.train()
        # No hook after the last step: a set returned then would never be trained on (the
        # deployable set is the sweep's), and the search's measurements are its whole cost.
        if (
            steps_per_epoch
            and on_epoch_end is not None
            and done % steps_per_epoch == 0
            and done < steps
        ):
            new_set = on_epoch_end(done // steps_per_epoch - 1, model, config_set)
            model.train()
            if new_set is not None:
                config_set = list(new_set)
                if not config_set:
                    raise ValueError("on_epoch_end returned an empty configuration set")
                record["config_set_size"] = len(config_set)
        history.append(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}")
        if log_path is not None and main:
            with log_path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if (
            out_dir is not None
            and main
            and (done == end or (checkpoint_every and done % checkpoint_every == 0))
        ):
            save_checkpoint(
                out_dir / CHECKPOINT_DIR, model, optimizer, done, config_set, sampler.state()
            )
    bar.close()
    distributed.barrier()  # the last checkpoint is on disk before any rank reads it
    return TrainResult(step=max(start, end), configs=config_set, history=history)


# -- evaluation ------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    model: CoALoRAModel,
    config: Configuration | None,
    batches: Iterable[Batch],
    metric: str = "auto",
) -> float:
    """Quality of ``config`` with the current adapter on ``batches``.

    ``metric``: ``auto`` (perplexity for a causal LM, accuracy for a classifier),
    ``perplexity``, ``accuracy`` or ``loss`` (mean token NLL / mean cross-entropy).
    ``config=None`` keeps the current configuration (e.g. in ``fp`` mode).
    """
    if metric == "auto":
        metric = "perplexity" if model.kind == "causal-lm" else "accuracy"
    if metric not in ("perplexity", "accuracy", "loss"):
        raise ValueError(f"unknown metric {metric!r}")
    was_training = model.training
    model.eval()
    if config is not None:
        model.retain([config])
        model.set_configuration(config)
    total, count, correct = 0.0, 0, 0
    for batch in batches:
        batch = to_device(batch, model.device)
        out = model(**batch)
        labels = batch["labels"]
        if model.kind == "causal-lm":
            n = int((labels[..., 1:] != -100).sum())
        else:
            n = int(labels.shape[0])
            correct += int((out.logits.argmax(-1) == labels).sum())
        total += float(out.loss) * n
        count += n
    model.train(was_training)
    if count == 0:
        raise ValueError("no evaluation examples")
    if metric == "accuracy":
        if model.kind == "causal-lm":
            raise ValueError("accuracy needs a classifier; use perplexity for a causal LM")
        return correct / count
    mean = total / count
    return math.exp(mean) if metric == "perplexity" else mean


def evaluate_configs(
    model: CoALoRAModel,
    configs: Sequence[Configuration],
    batches: Iterable[Batch],
    metric: str = "auto",
) -> list[float]:
    """``evaluate`` for each configuration with the current adapter (re-iterates ``batches``).

    Under a process group every rank calls it: the configurations are shared out over the
    ranks and every rank gets all the results."""
    batches = list(batches)
    return distributed.shared_map(lambda c: evaluate(model, c, batches, metric), configs)


# -- checkpoints -----------------------------------------------------------------------------
def save_checkpoint(
    path: str | Path,
    model: CoALoRAModel,
    optimizer: torch.optim.Optimizer,
    step: int,
    configs: Sequence[Configuration],
    sampler: list[dict[str, Any]] | None = None,
) -> None:
    """Write ``path``/{adapter,optimizer}.safetensors + trainer.json, replacing it whole."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_adapter(tmp / "adapter.safetensors")
    tensors, scalars = _optimizer_to_flat(optimizer)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    state = {
        "format": "coalora-checkpoint/1",
        "step": step,
        "param_names": list(model.trainable_parameters()),
        "optimizer": scalars,
        "configs": [c.to_dict() for c in configs],
        "coalora_config": model.cfg.to_dict(),
        "sampler": sampler or [],
    }
    (tmp / "trainer.json").write_text(json.dumps(state))
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def load_checkpoint(
    path: str | Path, model: CoALoRAModel, optimizer: torch.optim.Optimizer | None = None
) -> dict[str, Any]:
    """Restore trainables (and optimizer); returns {"step", "configs"}."""
    path = Path(path)
    try:
        state = json.loads((path / "trainer.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot read checkpoint {path}: {exc}") from None
    names = list(model.trainable_parameters())
    if state.get("param_names") != names:
        raise ValueError(f"checkpoint {path} was written for a different set of trainables")
    model.load_adapter(path / "adapter.safetensors")
    if optimizer is not None:
        tensors = load_file(str(path / "optimizer.safetensors"), device=str(model.device))
        optimizer.load_state_dict(_optimizer_from_flat(tensors, state["optimizer"]))
    configs = [model.space.config_from_dict(c) for c in state["configs"]]
    return {"step": int(state["step"]), "configs": configs, "sampler": state.get("sampler", [])}


def _optimizer_to_flat(
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    for idx, pstate in sd["state"].items():
        for key, value in pstate.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"{idx}.{key}"] = t.detach().cpu().contiguous().clone()
    return tensors, {"param_groups": sd["param_groups"]}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], scalars: dict[str, Any]) -> dict:
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    groups = scalars["param_groups"]
    for g in groups:
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}


def _truncate_log(log_path: Path, step: int) -> None:
    """Drop log lines past ``step`` (left by a run that stopped after its last checkpoint)."""
    if not log_path.exists():
        return
    keep = []
    for line in log_path.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            continue
    log_path.write_text("".join(k + "\n" for k in keep))
