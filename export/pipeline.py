"""The workstation job: a model and a dataset in, one bundle out. Read ``run_export`` top to bottom.

    1. data: load and validate, fixed-seed held-out split (recorded)
    2. model: load it, its configuration space; every bad input has failed by now
    3. calibration: E[x_k^2] of every quantized matrix's input on a few training texts, and
       (causal LMs) E[(dL/dy_j)^2] of its outputs, which weigh each output's error in step 4
    4. quantize + cost table: each (matrix, option) once, with that importance (the codes the
       bundle ships), then the calibration- (and loss-) weighted error of each
    5. initial training set: optimal (MILP) allocations at budgets over the trained bit range
    6. train CoA-LoRA, the Pareto search growing/pruning the training set between epochs
    7. dense sweep on held-out data: allocations at 2.5 ... 8 bits and unseen random
       configurations, each measured with the trained adapter; keep the non-dominated ones
    8. write the bundle (atomically), with a record of how it was trained

Everything slow lands in a work directory (default ``.cache/coalora/<model>-<hash>`` in the
project) keyed by a hash of the options that shape the result and of the data itself: a second
run with the same options reuses the calibration, the cost table, the checkpoint and the sweep;
``fresh=True`` starts over. Bad input raises ``ExportError`` before anything is written.

Where it runs: ``opts.device`` (``devices``); under torchrun (or Ray Train, ``ray_backend``)
every rank runs this same job, data-parallel, and rank 0 alone writes (``distributed``).
Big models: ``opts.dtype`` loads the frozen base in bf16/fp16 and ``opts.layerwise`` keeps
only codes (``memory``).

Where the rest lives: the options and presets in ``options``, steps 1-2 in ``inputs``, the
work directory in ``workdir``, the cached phases (3, 4, 5-6's training sets, 7) in ``phases``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from coalora.export.inputs import Inputs, load_data, load_for_training
from coalora.export.options import ExportError, ExportOptions
from coalora.export.phases import (
    TrainingSets,
    cached_calibration,
    cached_cost_table,
    cached_row_weights,
    cached_self_chat,
    cached_sweep,
    calibration_texts,
    final_loss,
    held_out_batches,
    input_hessians,
    torch_threads,
    train_log,
    with_self_chat,
)
from coalora.export.workdir import (
    CALIBRATION_FILE,
    COSTS_FILE,
    GRADIENTS_FILE,
    LOG_FILE,
    SEARCH_LOG_FILE,
    SUMMARY_FILE,
    TRAIN_DIR,
    TRAINING_SETS_FILE,
    Phases,
    checkpoint_step,
    log_to,
    open_work_dir,
    work_dir_for,
)
from coalora.kernels import ConfigError
from coalora.runtime.format.spec import Key, Training

log = logging.getLogger("coalora.export.pipeline")


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


# -- the job -------------------------------------------------------------------------------------
def run_export(opts: ExportOptions) -> ExportResult:
    """Train CoA-LoRA on ``opts.data`` for ``opts.model`` and write its bundle to ``opts.out``."""
    from coalora.export.calibration import CalibrationError
    from coalora.export.data import DataError
    from coalora.export.models import ModelLoadError
    from coalora.export.sweep import SweepError
    from coalora.runtime.budget import BudgetError

    opts.check()
    out = Path(opts.out).expanduser()
    if out.exists() and not opts.overwrite:
        raise ExportError(f"{out} already exists (pass --overwrite to replace it)")
    if opts.ray is not None:
        from coalora.export.ray_backend import run_on_ray

        return run_on_ray(opts)
    from coalora.export import distributed
    from coalora.export.devices import check_dtype, resolve_device

    device = resolve_device(opts.device)
    check_dtype(opts.dtype, device)
    try:
        with torch_threads(opts.threads), distributed.process_group(device):
            if not distributed.is_main():  # one progress display and log: rank 0's
                opts = replace(opts, progress=False)
            return _run(opts, out, device)
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


def _run(opts: ExportOptions, out: Path, device: Any) -> ExportResult:
    from coalora.export import distributed
    from coalora.export.coa_lora import CoALoRAModel, train
    from coalora.export.exporter import export_bundle
    from coalora.export.memory import release_freed, use_layerwise
    from coalora.export.sweep import metric_direction, sweep_budgets, with_head_options

    t_start = time.perf_counter()
    phase = Phases()
    reused: dict[str, bool] = {}

    # 1. data: fail on a bad file before the (slow) model load
    with phase("data"):
        inp = load_data(opts)
        split = inp.split

    # 2. model and configuration space; the last checks on the input
    with phase("load model"):
        load_for_training(opts, inp)
        loaded, space = inp.loaded, inp.space
        loaded.model.to(device)  # the one move: layers, caches and LoRA follow the base
        heads = opts.head_option_list()
        tied = bool(getattr(loaded.model.config, "tie_word_embeddings", False))
        if heads and (loaded.kind != "causal-lm" or not tied):
            raise ExportError("--head-options needs a causal LM with a tied LM head")
        budgets = sweep_budgets(space, opts.sweep_lo, opts.sweep_hi, opts.sweep_step)
        search_batches, sweep_held_out, disjoint = held_out_batches(
            inp.val_batches, opts.eval_batches, opts.sweep_batches
        )

    # The work directory: keyed by the options that shape training and by the data itself.
    # Rank 0 opens (and with --fresh clears) it; the other ranks then read what it holds.
    main = distributed.is_main()
    work = distributed.main_first(lambda: open_work_dir(opts, inp) if main else None)
    work = work_dir_for(opts, inp) if work is None else work
    if not main:
        opts = replace(opts, fresh=False)  # rank 0 has cleared what --fresh clears

    with log_to(work / LOG_FILE) if main else contextlib.nullcontext():
        log.info("work dir %s (%s)", work, "fresh" if opts.fresh else "reused when present")

        # 3. calibration on a few training texts (and the model's own conversations, if asked)
        if opts.chat_texts:
            with phase("self chat"):
                chat = distributed.main_first(
                    lambda: cached_self_chat(opts, loaded, work, opts.fresh)
                )
                with_self_chat(opts, inp, chat)
        else:
            chat = []
        with phase("calibration"):
            texts = calibration_texts(opts, split.train.texts, chat)
            moments, reused["calibration"] = distributed.main_first(
                lambda: cached_calibration(
                    loaded, texts, opts.calib_len, work / CALIBRATION_FILE, opts.fresh
                )
            )
            row_weights = distributed.main_first(
                lambda: cached_row_weights(opts, loaded, texts, work / GRADIENTS_FILE, opts.fresh)
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
            layerwise = use_layerwise(opts.layerwise, model, device)
            log.info("quantizing %s", "one layer at a time" if layerwise else "all layers")
            costs, reused["quantize + costs"] = cached_cost_table(
                model,
                moments,
                work / COSTS_FILE,
                opts.fresh,
                opts.progress,
                layerwise=layerwise,
                write=main,
                row_weights=row_weights,
            )
            costs = distributed.broadcast(costs)  # one table: the MILP starts must agree

        # 5. the starting training set: optimal allocations over the trained range (--train-range)
        with phase("initial set"):
            search = opts.pareto_search(
                space, search_batches, costs, log_path=work / SEARCH_LOG_FILE
            )
            initial = search.initial_set(opts.initial_budgets)
            sets = TrainingSets(work / TRAINING_SETS_FILE, initial, space, write=main)
            log.info("initial training set: %d configurations", len(initial))

        # 6. train, the Pareto search refreshing the set between epochs
        with phase("train"):
            train_dir = work / TRAIN_DIR
            done_before = checkpoint_step(train_dir)
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
                history=train_log(train_dir) if cfg.sampler != "uniform" else None,
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
            pareto, evaluated, reused["sweep"] = cached_sweep(
                model,
                costs,
                sweep_held_out,
                opts,
                budgets=budgets,
                seen=seen,
                work=work,
                adapter=train_dir / "checkpoint" / "adapter.safetensors",
                write=main,
            )
            if heads:
                pareto = with_head_options(
                    model, pareto, heads, sweep_held_out, progress=opts.progress
                )
            name, _ = metric_direction(loaded.kind)
            log.info(
                "Pareto set: %d of %d evaluated configurations (%s)%s",
                len(pareto),
                len(evaluated),
                name,
                f", each front entry measured with {len(heads)} heads" if heads else "",
            )

        # 8. the bundle, with a record of how it was made
        record = training_record(opts, inp, cfg, len(initial), sets, seen, train_dir)
        record[Training.SWEEP] = {
            "budgets": budgets,
            "evaluated": len(evaluated),
            "front": len(pareto),
            **({"head_options": [o.name for o in heads]} if heads else {}),
            Training.SWEEP_HELD_OUT_BATCHES: len(sweep_held_out),
            "disjoint_from_search": disjoint,
        }
        with phase("export"):
            record[Training.SECONDS] = {k: round(v, 2) for k, v in phase.seconds.items()}
            # the bundle ships codes: the last evaluation's dequantized weights can go first
            model.drop_cache()
            release_freed()
            if main:
                export_bundle(
                    model,
                    loaded,
                    pareto,
                    out,
                    lm_head=opts.lm_head_option(),
                    overwrite=opts.overwrite,
                    extra={Key.TRAINING: record},
                    sign_key=opts.sign,
                )
            distributed.barrier()
            bundle = out
        res = ExportResult(
            bundle=Path(bundle),
            work_dir=work,
            pareto=pareto,
            evaluated=evaluated,
            phases=dict(phase.seconds),
            reused=reused,
            record=record,
            seconds=time.perf_counter() - t_start,
        )
        if main:
            (work / SUMMARY_FILE).write_text("\n".join(res.summary()) + "\n", encoding="utf-8")
        return res


def training_record(
    opts: ExportOptions,
    inp: Inputs,
    cfg: Any,
    initial: int,
    sets: TrainingSets,
    seen: set,
    train_dir: Path,
) -> dict[str, Any]:
    """How the bundle was made (the manifest's ``training`` section), but for the sweep's
    figures and the time per phase, which the job adds."""
    import torch

    ds, split = inp.dataset, inp.split
    T = Training
    return {
        T.MODEL: opts.model,
        T.MODEL_SOURCE: inp.loaded.source,
        T.TASK: inp.task,
        T.DATA: {
            "source": ds.source,
            T.DATA_SHA256: inp.fingerprint,
            "examples": inp.n_total,
            "used": len(ds),
            "labels": ds.label_names,
        },
        T.SPLIT: {
            "seed": split.seed,
            "val_fraction": split.val_fraction,
            "train": len(split.train),
            "val": len(split.val),
            "val_indices": split.val_indices,
        },
        T.STEPS: opts.steps,
        T.OPTIONS: opts.training_key(),
        T.COALORA: cfg.to_dict(),
        T.INITIAL_SET: initial,
        T.SEARCH_EPOCHS: len(sets.sets) - 1,
        T.CONFIGURATIONS_TRAINED: len(seen),
        T.SWEEP: None,
        T.FINAL_LOSS: final_loss(train_dir),
        T.THREADS: torch.get_num_threads(),
    }


__all__ = ["ExportError", "ExportOptions", "ExportResult", "run_export"]
