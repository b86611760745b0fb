"""The workstation job: a model and a dataset in, one bundle out. Read ``run_export`` top to bottom.

    1. data: load and validate, fixed-seed held-out split (recorded)
    2. model: load it, its configuration space; every bad input has failed by now
    3. calibration: E[x_k^2] of every quantized matrix's input on a few training texts
    4. quantize + cost table: each (matrix, option) once, with that importance (the codes the
       bundle ships), then the calibration-weighted error of each
    5. initial training set: optimal (MILP) allocations at budgets over the whole bit range
    6. train CoA-LoRA, the Pareto search growing/pruning the training set every epoch
    7. dense sweep on held-out data: allocations at 2.5 ... 8 bits and unseen random
       configurations, each measured with the trained adapter; keep the non-dominated ones
    8. write the bundle (atomically), with a record of how it was trained

Everything slow lands in a work directory (default ``.cache/coalora/<model>-<hash>`` in the
project) keyed by a hash of the options that shape the result and of the data itself: a second
run with the same options reuses the calibration, the cost table, the checkpoint and the sweep;
``fresh=True`` starts over. Bad input raises ``ExportError`` before anything is written.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from coalora.export.quantizers import DEFAULT_QUANTIZER, QUANTIZERS
from coalora.kernels import DEFAULT_OPTIONS, ConfigError, ConfigSpace, Configuration, QuantOption

log = logging.getLogger("coalora.export.pipeline")

TASKS = ("auto", "causal-lm", "classify")
LOG_FILE = "export.log"


class ExportError(ValueError):
    """Unusable input or options; the message says what is wrong and how to fix it."""


# -- options -----------------------------------------------------------------------------------
@dataclass
class ExportOptions:
    """Everything ``run_export`` needs. ``ExportOptions.for_model`` fills per-model defaults."""

    model: str  # "smollm2", "minilm", a .gguf file or a Hugging Face model folder
    out: str | Path  # the bundle directory
    data: str = "bbc"  # "bbc" (BBC News, offline), a .jsonl file or a folder
    task: str = "auto"  # auto: causal-lm for decoders (LLaMA), classify for encoders (BERT)
    work_dir: str | Path | None = None  # checkpoints, logs, caches; None: .cache/coalora/...
    # training
    steps: int = 200
    batch_size: int = 8
    seq_len: int = 128
    rank: int = 16
    alpha: float = 32.0
    # 1e-4 (the paper's, for long runs) learns nothing in 60 steps on MiniLM; 2e-3 does.
    lr: float = 2e-3
    configs_per_step: int = 2
    # quality levers (CoALoRAConfig, export/coa_lora; the baselines take the same):
    # a step's configurations: "uniform" draw or "sandwich" (ends of the set + loss-weighted)
    sampler: str = "uniform"
    # LoRA start: "zero" (B = 0) or "residual" (top-r SVD of W - Q(W) at the cheapest option)
    lora_init: str = "zero"
    # loss = (1 - w) cross-entropy + w KL to the shipped weights' top-k logits (causal LMs)
    distill_weight: float = 0.0
    steps_per_epoch: int = 50  # Pareto search every this many steps; 0 keeps the set frozen
    proposals_per_epoch: int = 6
    search_candidates: int = 256
    # configurations of the set the search re-measures each epoch (spread over its bits, the
    # rest estimated); None: all of them, so its cost grows with the set
    search_rescore: int | None = None
    initial_budgets: int = 24  # MILP allocations in the starting training set
    eval_batches: int = 4  # held-out batches for the search (and as many for the sweep)
    val_fraction: float = 0.1
    seed: int = 0
    # calibration and quantization
    calib_texts: int = 32
    calib_len: int = 256
    options: tuple[str, ...] = tuple(o.name for o in DEFAULT_OPTIONS)
    # "gptq" (error feedback through the input Hessian), "search" (per-block clipping search)
    # or "rtn" (round-to-nearest); the default and its measurement: export/quantizers
    quantizer: str = DEFAULT_QUANTIZER
    # the deployable Pareto set
    sweep_lo: float = 2.5
    sweep_hi: float = 8.0
    sweep_step: float = 0.25
    sweep_random: int = 8  # random configurations never seen in training
    # held-out batches the sweep measures on (after the search's); None: eval_batches. Only
    # the sweep reads them, so raising it reuses the trained adapter.
    sweep_batches: int | None = None
    lm_head: str | None = "8b32"  # the causal LM head's option in the bundle; None: fp32
    # the run
    threads: int | None = None
    limit: int | None = None  # use at most this many examples (fast runs)
    fresh: bool = False
    overwrite: bool = False
    progress: bool = True

    @classmethod
    def for_model(
        cls, model: str, out: str | Path, *, fast: bool = False, **overrides: Any
    ) -> ExportOptions:
        """Defaults for ``model`` (see ``MODEL_PRESETS``), then ``FAST_PRESET`` and the model's
        ``FAST_MODEL_PRESETS`` when ``fast``, then ``overrides`` (``None`` values are ignored,
        so a CLI can pass unset flags)."""
        values: dict[str, Any] = {}
        values.update(MODEL_PRESETS.get(model.strip().lower(), {}))
        if fast:
            values.update(FAST_PRESET)
            values.update(FAST_MODEL_PRESETS.get(model.strip().lower(), {}))
        values.update({k: v for k, v in overrides.items() if v is not None})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ExportError(f"unknown export option(s): {', '.join(unknown)}")
        return cls(model=model, out=out, **values)

    def adapter_config(self, **overrides: Any) -> Any:
        """The CoA-LoRA settings (``CoALoRAConfig``) these options train with; baselines
        override a field. Imported here: the module loads without torch."""
        from coalora.export.coa_lora import CoALoRAConfig

        return CoALoRAConfig(
            rank=self.rank,
            alpha=self.alpha,
            lr=self.lr,
            configs_per_step=self.configs_per_step,
            seed=self.seed,
            sampler=self.sampler,
            lora_init=self.lora_init,
            distill_weight=self.distill_weight,
            **overrides,
        )

    def pareto_search(
        self, space: Any, eval_batches: Any, costs: Any, log_path: Path | None = None
    ) -> Any:
        """The Pareto configuration search (``ParetoSearch``) these options run."""
        from coalora.export.coa_lora.search import ParetoSearch

        return ParetoSearch(
            space,
            eval_batches=eval_batches,
            allocation_costs=costs,
            proposals_per_epoch=self.proposals_per_epoch,
            candidates=self.search_candidates,
            rescore=self.search_rescore,
            seed=self.seed,
            log_path=log_path,
        )

    def check(self) -> None:
        """Reject impossible options before any work."""
        positive = ("steps", "batch_size", "rank", "configs_per_step", "eval_batches")
        positive += ("initial_budgets", "calib_texts", "calib_len", "proposals_per_epoch")
        positive += ("search_candidates",)
        for name in positive:
            if getattr(self, name) < 1:
                raise ExportError(
                    f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.seq_len < 2:
            raise ExportError(f"seq-len must be >= 2, got {self.seq_len}")
        if self.steps_per_epoch < 0:
            raise ExportError(f"steps-per-epoch must be >= 0, got {self.steps_per_epoch}")
        if not 0 < self.val_fraction < 1:
            raise ExportError(f"val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.lr <= 0 or self.alpha <= 0:
            raise ExportError("lr and alpha must be positive")
        from coalora.export.coa_lora.config import LORA_INITS, SAMPLERS

        if self.sampler not in SAMPLERS:
            raise ExportError(f"unknown sampler {self.sampler!r}: expected {' or '.join(SAMPLERS)}")
        if self.lora_init not in LORA_INITS:
            raise ExportError(
                f"unknown lora-init {self.lora_init!r}: expected {' or '.join(LORA_INITS)}"
            )
        if not 0.0 <= self.distill_weight <= 1.0:
            raise ExportError(f"distill-weight must be in [0, 1], got {self.distill_weight}")
        if self.task not in TASKS:
            raise ExportError(f"unknown task {self.task!r}: expected one of {', '.join(TASKS)}")
        if self.quantizer not in QUANTIZERS:
            raise ExportError(
                f"unknown quantizer {self.quantizer!r}: expected one of {', '.join(QUANTIZERS)}"
            )
        if self.sweep_step <= 0 or self.sweep_lo > self.sweep_hi:
            raise ExportError(
                f"impossible sweep budgets {self.sweep_lo:g}-{self.sweep_hi:g} step "
                f"{self.sweep_step:g}: need low <= high and a positive step"
            )
        if self.search_rescore is not None and self.search_rescore < 2:
            raise ExportError(f"search-rescore must be >= 2, got {self.search_rescore}")
        if self.sweep_batches is not None and self.sweep_batches < 1:
            raise ExportError(f"sweep-batches must be >= 1, got {self.sweep_batches}")
        if self.sweep_random < 0:
            raise ExportError(f"sweep-random must be >= 0, got {self.sweep_random}")
        if self.limit is not None and self.limit < 2:
            raise ExportError(f"limit must be >= 2 examples, got {self.limit}")
        if self.threads is not None and self.threads < 1:
            raise ExportError(f"threads must be >= 1, got {self.threads}")
        self.quant_options()
        self.lm_head_option()

    def quant_options(self) -> tuple[QuantOption, ...]:
        try:
            opts = tuple(dict.fromkeys(QuantOption.parse(o) for o in self.options))
        except ValueError as exc:
            raise ExportError(f"bad quantization option: {exc}") from None
        if not opts:
            raise ExportError("no quantization options given (e.g. 2b64,4b64,8b64)")
        return opts

    def lm_head_option(self) -> QuantOption | None:
        if self.lm_head is None or str(self.lm_head).lower() in ("none", "fp32", ""):
            return None
        try:
            return QuantOption.parse(str(self.lm_head))
        except ValueError as exc:
            raise ExportError(f"bad --lm-head option: {exc}") from None

    def training_key(self) -> dict[str, Any]:
        """The options that shape calibration, costs and training (the work directory's key).

        Paths of the output, the sweep and how the run is executed do not change what is
        trained, so they stay out: changing them reuses the checkpoint.
        """
        skip = {"out", "work_dir", "fresh", "overwrite", "progress", "threads", "lm_head"}
        skip |= {"sweep_lo", "sweep_hi", "sweep_step", "sweep_random", "sweep_batches"}
        d = {k: v for k, v in asdict(self).items() if k not in skip}
        d["options"] = list(d["options"])
        return d


# Defaults per offline model: SmolLM2-135M-Instruct (LLaMA, 30 layers, causal LM on BBC News
# text) and all-MiniLM-L6-v2 (BERT, 6 layers, BBC News topic classification, 5 classes).
MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "smollm2": dict(steps=200, batch_size=4, seq_len=256, steps_per_epoch=50, eval_batches=4),
    "minilm": dict(steps=300, batch_size=16, seq_len=128, steps_per_epoch=75, eval_batches=4),
}
# Demos and tests: minutes on 2 cores, a short adapter. The default quantizer stays on: the
# search cuts SmolLM2's weighted error 3x against round-to-nearest at 4 bits, and gptq its
# no-adapter perplexity 2.6x below the search's at 3.5 bits, which decides whether a low-bit
# configuration answers coherently at all.
FAST_PRESET: dict[str, Any] = dict(
    steps=16,
    batch_size=2,
    seq_len=64,
    steps_per_epoch=4,
    proposals_per_epoch=2,
    search_candidates=48,
    initial_budgets=6,
    eval_batches=2,
    calib_texts=8,
    calib_len=128,
    options=("2b64", "4b64", "8b64"),
    quantizer=DEFAULT_QUANTIZER,
    sweep_step=0.5,
    sweep_random=2,
    limit=300,
)


# A classifier's metric is accuracy: with the preset's 2 batches of 2 held-out articles every
# configuration scores the same few values (often all 0 after 16 steps) and the Pareto set
# collapses to one point. MiniLM is cheap enough for 8x more held-out articles.
FAST_MODEL_PRESETS: dict[str, dict[str, Any]] = {
    "minilm": dict(batch_size=8, eval_batches=4, val_fraction=0.2),
}


# -- result --------------------------------------------------------------------------------------
@dataclass
class ExportResult:
    bundle: Path
    work_dir: Path
    pareto: Any  # ParetoSet: the shipped front
    evaluated: list[dict[str, Any]]  # every swept point: bits, metric, seen, source
    phases: dict[str, float]  # seconds per phase
    reused: dict[str, bool]  # which phases came from the work directory
    record: dict[str, Any]  # what the bundle's manifest stores under "training"
    seconds: float = 0.0

    def summary(self) -> list[str]:
        """A few lines for the user: the front, what was reused, time per phase."""
        p = self.pareto
        direction = "higher" if p.higher_is_better else "lower"
        unseen = sum(not e.seen_in_training for e in p.entries)
        lines = [
            f"bundle: {self.bundle}",
            f"work dir: {self.work_dir}",
            f"Pareto set: {len(p)} configurations ({unseen} never seen in training) out of "
            f"{len(self.evaluated)} evaluated; {p.metric_name} ({direction} is better):",
        ]
        for e in p.entries:
            tag = "" if e.seen_in_training else "  (unseen)"
            lines.append(f"  {e.bits:6.3f} bits  {e.nbytes / 2**20:9.2f} MiB  {e.metric:.4f}{tag}")
        width = max(len(k) for k in self.phases)
        lines.append("time per phase:")
        for name, sec in self.phases.items():
            note = "  (reused)" if self.reused.get(name) else ""
            lines.append(f"  {name:<{width}}  {sec:8.1f} s{note}")
        lines.append(f"  {'total':<{width}}  {self.seconds:8.1f} s")
        return lines


# -- small helpers ---------------------------------------------------------------------------
class _Phases:
    """Wall time per named phase, logged as each ends."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        log.info("[%s] ...", name)
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0
            log.info("[%s] %.1f s", name, self.seconds[name])


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    import torch

    before = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def _log_to(path: Path) -> Iterator[None]:
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    level = log.level
    # The work dir's log gets INFO even when the caller configured no logging (the root's
    # last-resort handler still shows warnings only).
    if log.getEffectiveLevel() > logging.INFO:
        log.setLevel(logging.INFO)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        handler.close()


# What the job writes in its work directory; --fresh removes these and nothing else (the
# directory may be one the user named).
_WORK_FILES = (
    "options.json",
    "split.json",
    "calibration.safetensors",
    "costs.json",
    "training_sets.json",
    "search_log.jsonl",
    "sweep.json",
    "summary.txt",
    LOG_FILE,
)
_WORK_DIRS = ("train",)


def _clear_work(work: Path) -> None:
    for name in _WORK_FILES:
        (work / name).unlink(missing_ok=True)
    for name in _WORK_DIRS:
        shutil.rmtree(work / name, ignore_errors=True)


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    tmp.replace(path)  # a crash never leaves a truncated cache file


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def project_cache_root() -> Path:
    """``<project>/.cache/coalora`` for a source checkout (git-ignored), else under the cwd."""
    import coalora

    root = Path(coalora.__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file():
        root = Path.cwd()
    return root / ".cache" / "coalora"


def _slug(model: str) -> str:
    name = Path(model).name if ("/" in model or "\\" in model) else model
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(name).stem or name).strip("-").lower() or "model"


def _digest(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def model_kind(model: str) -> str:
    """ "causal-lm" or "encoder" without loading weights (a missing model fails here, fast)."""
    from coalora.export import models

    path = models._resolve(model)
    if path.suffix == ".gguf":
        return "causal-lm"  # GGUF files are llama.cpp decoders
    config = _read_json(path / "config.json") or {}
    return "encoder" if config.get("model_type") in models._ENCODER_TYPES else "causal-lm"


def resolve_task(task: str, kind: str) -> str:
    if task == "auto":
        return "classify" if kind == "encoder" else "causal-lm"
    if task == "causal-lm" and kind == "encoder":
        raise ExportError("an encoder (BERT-like) model cannot be trained as a causal LM")
    return task


# -- the cached phases -----------------------------------------------------------------------
def cached_calibration(loaded: Any, texts: Sequence[str], max_length: int, path: Path, fresh: bool):
    """E[x_k^2] per matrix, from ``path`` when a previous run wrote it."""
    from safetensors.numpy import load_file, save_file

    from coalora.export.calibration import activation_second_moments

    if path.is_file() and not fresh:
        log.info("reusing calibration from %s", path)
        return {k: v for k, v in load_file(str(path)).items()}, True
    moments = activation_second_moments(loaded, list(texts), max_length=max_length)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: np.ascontiguousarray(v) for k, v in moments.items()}, str(tmp))
    tmp.replace(path)
    return moments, False


def input_hessians(opts: ExportOptions, loaded: Any, texts: Sequence[str]) -> dict | None:
    """E[x x^T] of every matrix input on the calibration texts, when the quantizer needs them
    (not cached: a pass over the texts costs less than reading 400 MB for SmolLM2)."""
    from coalora.export.quantizers import needs_hessian
    from coalora.export.quantizers.hessians import activation_hessians

    if not needs_hessian(opts.quantizer):
        return None
    return activation_hessians(loaded, list(texts), max_length=opts.calib_len)


def cached_cost_table(
    model: Any, moments: dict[str, np.ndarray], path: Path, fresh: bool, progress: bool
):
    """Calibration-weighted error of every (matrix, option), read off the model's own quantized
    weights: the quantizer runs once per pair for both the costs and training. A layer with a
    Hessian (the gptq quantizer) gets the full tr((W-Q) H (W-Q)^T), else its diagonal."""
    from tqdm.auto import tqdm

    from coalora.export.allocation import CostTable
    from coalora.export.quantizers import output_error

    space: ConfigSpace = model.space
    cached = None if fresh else _read_json(path)
    names = [m.name for m in space.matrices]
    opts = [o.name for o in space.options]
    if cached and cached.get("matrices") == names and cached.get("options") == opts:
        log.info("reusing cost table from %s", path)
        return CostTable(tuple(names), tuple(space.options), np.array(cached["costs"])), True
    costs = np.zeros((len(names), len(opts)))
    bar = tqdm(total=costs.size, desc="quantize", unit="q", disable=not progress, leave=False)
    with bar:
        for i, name in enumerate(names):
            layer = model.layers[name]
            w = layer.weight.detach().float().cpu().numpy()
            imp = np.asarray(moments[name], dtype=np.float64)
            for j, opt in enumerate(space.options):
                d = w - layer.quantized_weight(opt).cpu().numpy()
                costs[i, j] = output_error(d, importance=imp, hessian=layer.hessian)
                bar.update(1)
    _write_json(path, {"matrices": names, "options": opts, "costs": costs.tolist()})
    return CostTable(tuple(names), tuple(space.options), costs), False


class TrainingSets:
    """The training configuration set in force from each step on, persisted (with a ``path``)
    so a resumed or reused run still knows exactly which configurations training drew
    (``seen``)."""

    def __init__(
        self, path: Path | None, initial: Sequence[Configuration], space: ConfigSpace
    ) -> None:
        self.path = path
        self.space = space
        stored = _read_json(path) if path is not None else None
        if stored:
            self.sets = [
                (int(s["from_step"]), [space.config_from_dict(c) for c in s["configs"]])
                for s in stored
            ]
        else:
            self.sets = [(0, list(initial))]
            self._save()

    def _save(self) -> None:
        if self.path is None:
            return
        _write_json(
            self.path,
            [{"from_step": s, "configs": [c.to_dict() for c in cs]} for s, cs in self.sets],
        )

    def hook(self, search: Callable, steps_per_epoch: int) -> Callable:
        """``search`` as ``train``'s epoch hook, recording each set it returns."""

        def on_epoch_end(epoch: int, model: Any, current: list[Configuration]):
            new = list(search(epoch, model, current))
            start = (epoch + 1) * steps_per_epoch
            self.sets = [(s, cs) for s, cs in self.sets if s < start] + [(start, new)]
            self._save()
            return new

        return on_epoch_end

    def seen(
        self, steps: int, configs_per_step: int, seed: int, history: Sequence[dict] | None = None
    ) -> set[Configuration]:
        """Every configuration a training step drew: the trainer's uniform sampling replayed,
        or read off the training log's records (``history``: their ``drawn`` positions in the
        set in force), which a loss-driven sampler needs."""
        from coalora.export.coa_lora.train import sample_configs

        out: set[Configuration] = set()
        if history is not None:
            for rec in history:
                step = int(rec["step"]) - 1
                configs = [cs for start, cs in self.sets if start <= step][-1]
                out.update(configs[int(i)] for i in rec["drawn"])
            return out
        for i, (start, configs) in enumerate(self.sets):
            end = self.sets[i + 1][0] if i + 1 < len(self.sets) else steps
            for step in range(start, min(end, steps)):
                out.update(sample_configs(configs, configs_per_step, seed, step))
        return out


def _checkpoint_step(train_dir: Path) -> int:
    from coalora.export.coa_lora.train import CHECKPOINT_DIR

    state = _read_json(train_dir / CHECKPOINT_DIR / "trainer.json")
    return int(state["step"]) if state else 0


def held_out_batches(val: Any, n: int, measure: int | None = None) -> tuple[list, list, bool]:
    """(search batches, measuring batches, disjoint?): the first ``n`` held-out batches for the
    search, the next ``measure`` (default ``n``) to measure on, which the search did not select
    by; when the held-out split has no more than ``n`` batches both use the same ones."""
    held = val.head(n + (n if measure is None else measure))
    if len(held) > n:
        return held[:n], held[n:], True
    return held, held, False


# -- the inputs: data, model, batches, work directory -------------------------------------
@dataclass
class Inputs:
    """What steps 1-2 produce (``load_data`` then ``load_for_training``)."""

    task: str  # "causal-lm" or "classify"
    dataset: Any  # TextDataset, after --limit
    n_total: int  # examples before --limit
    split: Any  # data.Split
    fingerprint: str  # sha256 of the texts and labels used
    loaded: Any = None  # LoadedModel
    space: ConfigSpace | None = None
    train_batches: Any = None  # data.Batches
    val_batches: Any = None

    @property
    def key(self) -> dict[str, Any]:
        return {"task": self.task, "data_sha256": self.fingerprint}


def load_data(opts: ExportOptions) -> Inputs:
    """Validate the model name and the data, subsample (``limit``), split with a fixed seed."""
    from coalora.export.data import load_dataset, train_val_split

    task = resolve_task(opts.task, model_kind(opts.model))
    ds = load_dataset(opts.data, "classify" if task == "classify" else "lm")
    n_total = len(ds)
    if opts.limit is not None and len(ds) > opts.limit:
        keep = np.random.default_rng(opts.seed).permutation(len(ds))[: opts.limit]
        ds = ds.subset(sorted(int(i) for i in keep))
    if opts.distill_weight > 0 and task == "classify":
        raise ExportError("--distill-weight needs a causal LM (a classifier head has no teacher)")
    split = train_val_split(ds, opts.val_fraction, opts.seed)
    log.info(
        "data %s: %d examples (%d train, %d held out, seed %d)",
        ds.source,
        len(ds),
        len(split.train),
        len(split.val),
        opts.seed,
    )
    fingerprint = _digest({"texts": ds.texts, "labels": ds.labels})
    return Inputs(task, ds, n_total, split, fingerprint)


def load_for_training(opts: ExportOptions, inp: Inputs) -> Inputs:
    """Load the model (with a fresh head for classification), its space and the batches."""
    from coalora.export.data import classification_batches, lm_batches
    from coalora.export.models import config_space, load_model

    ds, split = inp.dataset, inp.split
    classify = inp.task == "classify"
    loaded = load_model(
        opts.model,
        task="classify" if classify else None,
        num_labels=ds.num_labels if classify else None,
    )
    if classify and ds.label_names:  # the bundle names its classes
        loaded.model.config.id2label = dict(enumerate(ds.label_names))
        loaded.model.config.label2id = {n: i for i, n in enumerate(ds.label_names)}
    inp.loaded = loaded
    inp.space = config_space(loaded.model, opts.quant_options())
    make = classification_batches if classify else lm_batches
    tok = loaded.tokenizer
    inp.train_batches = make(split.train, tok, opts.seq_len, opts.batch_size, opts.seed)
    try:
        inp.val_batches = make(split.val, tok, opts.seq_len, opts.batch_size, opts.seed)
    except ValueError as exc:
        raise ExportError(
            f"the held-out split is too small ({exc}): lower --seq-len or raise --val-fraction"
        ) from None
    return inp


def work_dir_for(opts: ExportOptions, inp: Inputs) -> Path:
    """``opts.work_dir``, else ``.cache/coalora/<model>-<hash of the training options + data>``."""
    if opts.work_dir is not None:
        return Path(opts.work_dir).expanduser()
    key = {**opts.training_key(), **inp.key}
    return project_cache_root() / f"{_slug(opts.model)}-{_digest(key)[:12]}"


# -- the job -------------------------------------------------------------------------------------
def run_export(opts: ExportOptions) -> ExportResult:
    """Train CoA-LoRA on ``opts.data`` for ``opts.model`` and write its bundle to ``opts.out``."""
    from coalora.export.allocation import BudgetError
    from coalora.export.calibration import CalibrationError
    from coalora.export.data import DataError
    from coalora.export.models import ModelLoadError
    from coalora.export.sweep import SweepError

    opts.check()
    out = Path(opts.out).expanduser()
    if out.exists() and not opts.overwrite:
        raise ExportError(f"{out} already exists (pass --overwrite to replace it)")
    try:
        with torch_threads(opts.threads):
            return _run(opts, out)
    except (
        ModelLoadError,
        DataError,
        BudgetError,
        CalibrationError,
        SweepError,
        ConfigError,
    ) as exc:
        if isinstance(exc, ExportError):
            raise
        raise ExportError(str(exc)) from exc
    except FileExistsError as exc:  # the out dir appeared while training
        raise ExportError(f"{exc} (pass --overwrite to replace it)") from exc


def _run(opts: ExportOptions, out: Path) -> ExportResult:
    import torch

    from coalora.export.coa_lora import CoALoRAModel, train
    from coalora.export.sweep import dense_sweep, metric_direction, sweep_budgets

    t_start = time.perf_counter()
    phase = _Phases()
    reused: dict[str, bool] = {}

    # 1. data: fail on a bad file before the (slow) model load
    with phase("data"):
        inp = load_data(opts)
        ds, split = inp.dataset, inp.split

    # 2. model and configuration space; the last checks on the input
    with phase("load model"):
        load_for_training(opts, inp)
        loaded, space = inp.loaded, inp.space
        budgets = sweep_budgets(space, opts.sweep_lo, opts.sweep_hi, opts.sweep_step)
        search_batches, sweep_held_out, disjoint = held_out_batches(
            inp.val_batches, opts.eval_batches, opts.sweep_batches
        )

    # The work directory: keyed by the options that shape training and by the data itself.
    work = work_dir_for(opts, inp)
    key = {**opts.training_key(), **inp.key}
    if opts.fresh:
        _clear_work(work)
    previous = _read_json(work / "options.json")
    if previous is not None and previous != key:
        changed = sorted(k for k in key.keys() | previous.keys() if key.get(k) != previous.get(k))
        raise ExportError(
            f"work dir {work} holds a run with other options ({', '.join(changed)}): "
            "pass --fresh to start over there, or another --work-dir"
        )
    work.mkdir(parents=True, exist_ok=True)
    _write_json(work / "options.json", key)
    _write_json(
        work / "split.json", {"source": ds.source, "n_total": inp.n_total, **split.to_dict()}
    )

    with _log_to(work / LOG_FILE):
        log.info("work dir %s (%s)", work, "fresh" if opts.fresh else "reused when present")

        # 3. calibration on a few training texts
        with phase("calibration"):
            rng = np.random.default_rng(opts.seed)
            pick = rng.permutation(len(split.train))[: opts.calib_texts]
            texts = [split.train.texts[int(i)] for i in pick]
            moments, reused["calibration"] = cached_calibration(
                loaded, texts, opts.calib_len, work / "calibration.safetensors", opts.fresh
            )

        # 4. the adapter model (quantizing with that importance, as the bundle will) and the
        # cost table read off its quantized weights
        with phase("quantize + costs"):
            cfg = opts.adapter_config()
            model = CoALoRAModel(
                loaded.model,
                space,
                cfg,
                kind=loaded.kind,
                importance=moments,
                method=opts.quantizer,
                hessians=input_hessians(opts, loaded, texts),
            )
            costs, reused["quantize + costs"] = cached_cost_table(
                model, moments, work / "costs.json", opts.fresh, opts.progress
            )

        # 5. the starting training set: optimal allocations over the whole bit range
        with phase("initial set"):
            search = opts.pareto_search(
                space, search_batches, costs, log_path=work / "search_log.jsonl"
            )
            initial = search.initial_set(opts.initial_budgets)
            sets = TrainingSets(work / "training_sets.json", initial, space)
            log.info("initial training set: %d configurations", len(initial))

        # 6. train, the Pareto search refreshing the set every epoch
        with phase("train"):
            train_dir = work / "train"
            done_before = _checkpoint_step(train_dir)
            reused["train"] = done_before >= opts.steps
            if reused["train"]:
                log.info("reusing checkpoint at step %d: no training", done_before)
            elif done_before:
                log.info("resuming from the checkpoint at step %d", done_before)
            spe = opts.steps_per_epoch
            result = train(
                model,
                inp.train_batches,
                sets.sets[0][1],
                steps=opts.steps,
                out_dir=train_dir,
                steps_per_epoch=spe or None,
                on_epoch_end=sets.hook(search, spe) if spe else None,
                checkpoint_every=spe or max(1, opts.steps // 4),
                progress=opts.progress,
            )
            seen = sets.seen(
                opts.steps,
                opts.configs_per_step,
                opts.seed,
                history=_train_log(train_dir) if cfg.sampler != "uniform" else None,
            )
            losses = [r["loss"] for r in result.history]
            if losses:
                log.info(
                    "trained steps %d-%d: loss %.4f -> %.4f",
                    done_before + 1,
                    result.step,
                    losses[0],
                    losses[-1],
                )
            log.info("training drew %d distinct configurations", len(seen))

        # 7. the deployable Pareto set, measured with the trained adapter
        with phase("sweep"):
            adapter_sha = _file_digest(train_dir / "checkpoint" / "adapter.safetensors")
            sweep_key = {
                "adapter": adapter_sha,
                "budgets": budgets,
                "random": opts.sweep_random,
                "seed": opts.seed,
                "batches": opts.eval_batches,
                "measured_on": len(sweep_held_out),
            }
            cached = None if opts.fresh else _read_json(work / "sweep.json")
            if cached and cached.get("key") == sweep_key:
                log.info("reusing the sweep from %s", work / "sweep.json")
                reused["sweep"] = True
                pareto, evaluated = _sweep_from_cache(cached, space, loaded.kind)
            else:
                reused["sweep"] = False
                front, points = dense_sweep(
                    model,
                    costs,
                    sweep_held_out,
                    lo=opts.sweep_lo,
                    hi=opts.sweep_hi,
                    step=opts.sweep_step,
                    n_random=opts.sweep_random,
                    seen=seen,
                    seed=opts.seed,
                    progress=opts.progress,
                )
                evaluated = [{**p.entry.to_dict(), "source": p.source} for p in points]
                _write_json(work / "sweep.json", {"key": sweep_key, "points": evaluated})
                pareto = front
            name, _ = metric_direction(loaded.kind)
            log.info(
                "Pareto set: %d of %d evaluated configurations (%s)",
                len(pareto),
                len(evaluated),
                name,
            )

        # 8. the bundle, with a record of how it was made
        record = {
            "model": opts.model,
            "model_source": loaded.source,
            "task": inp.task,
            "data": {
                "source": ds.source,
                "sha256": inp.fingerprint,
                "examples": inp.n_total,
                "used": len(ds),
                "labels": ds.label_names,
            },
            "split": {
                "seed": split.seed,
                "val_fraction": split.val_fraction,
                "train": len(split.train),
                "val": len(split.val),
                "val_indices": split.val_indices,
            },
            "steps": opts.steps,
            "options": opts.training_key(),
            "coalora": cfg.to_dict(),
            "initial_set": len(initial),
            "search_epochs": len(sets.sets) - 1,
            "configurations_trained": len(seen),
            "sweep": {
                "budgets": budgets,
                "evaluated": len(evaluated),
                "front": len(pareto),
                "held_out_batches": len(sweep_held_out),
                "disjoint_from_search": disjoint,
            },
            "final_loss": _final_loss(train_dir),
            "threads": torch.get_num_threads(),
        }
        with phase("export"):
            from coalora.export.exporter import export_bundle

            record["seconds"] = {k: round(v, 2) for k, v in phase.seconds.items()}
            bundle = export_bundle(
                model,
                loaded,
                pareto,
                out,
                lm_head=opts.lm_head_option(),
                overwrite=opts.overwrite,
                extra={"training": record},
            )
        total = time.perf_counter() - t_start
        res = ExportResult(
            bundle=Path(bundle),
            work_dir=work,
            pareto=pareto,
            evaluated=evaluated,
            phases=dict(phase.seconds),
            reused=reused,
            record=record,
            seconds=total,
        )
        (work / "summary.txt").write_text("\n".join(res.summary()) + "\n", encoding="utf-8")
        return res


def _train_log(train_dir: Path) -> list[dict]:
    """Every step's record from the training log (all of them, also when resumed)."""
    from coalora.export.coa_lora.train import LOG_FILE as TRAIN_LOG

    path = train_dir / TRAIN_LOG
    lines = path.read_text(encoding="utf-8").splitlines() if path.is_file() else []
    return [json.loads(line) for line in lines if line.strip()]


def _final_loss(train_dir: Path, last: int = 5) -> float | None:
    """Mean training loss over the last steps, from the log (also when training was reused)."""
    from coalora.export.coa_lora.train import LOG_FILE as TRAIN_LOG

    path = train_dir / TRAIN_LOG
    if not path.is_file():
        return None
    losses = []
    for line in path.read_text(encoding="utf-8").splitlines()[-last:]:
        with contextlib.suppress(json.JSONDecodeError, KeyError):
            losses.append(float(json.loads(line)["loss"]))
    return float(np.mean(losses)) if losses else None


def _sweep_from_cache(cached: dict, space: ConfigSpace, kind: str) -> tuple[Any, list[dict]]:
    from coalora.export.sweep import SweepPoint, pareto_set
    from coalora.runtime.selection import ParetoEntry

    points = []
    for p in cached["points"]:
        entry = ParetoEntry(
            config=space.config_from_dict(p),
            bits=float(p["bits"]),
            nbytes=int(p["nbytes"]),
            metric=float(p["metric"]),
            seen_in_training=bool(p["seen_in_training"]),
        )
        points.append(SweepPoint(entry, p.get("source", "")))
    return pareto_set(points, kind).front(), list(cached["points"])


__all__ = [
    "FAST_MODEL_PRESETS",
    "FAST_PRESET",
    "MODEL_PRESETS",
    "ExportError",
    "ExportOptions",
    "ExportResult",
    "Inputs",
    "TrainingSets",
    "cached_calibration",
    "cached_cost_table",
    "held_out_batches",
    "input_hessians",
    "load_data",
    "load_for_training",
    "run_export",
    "work_dir_for",
]
