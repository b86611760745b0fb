"""Distributed runs for the tests: a tiny LLaMA trained with the Pareto search, the same in
every process, and the spawned ranks that train it over a gloo process group."""

from __future__ import annotations

import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any

import torch
from bundles import OPTIONS, _configs, _texts

from coalora.export.coa_lora import CoALoRAConfig, CoALoRAModel, train
from coalora.export.coa_lora.search import ParetoSearch
from coalora.export.data import TextDataset, lm_batches
from coalora.export.models import config_space, tiny_llama, tiny_tokenizer
from coalora.export.sweep import evaluate_sweep

STEPS = 6
STEPS_PER_EPOCH = 3
GLOBAL_BATCH = 4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def build() -> tuple[CoALoRAModel, Any, list, ParetoSearch]:
    """The model, its batches (global batch 4), training set and search: the same bits in
    every process."""
    tok = tiny_tokenizer()
    base = tiny_llama()
    space = config_space(base, OPTIONS)
    cfg = CoALoRAConfig(rank=4, alpha=8, lr=3e-3, configs_per_step=2)
    model = CoALoRAModel(base, space, cfg)
    batches = lm_batches(TextDataset(_texts(40, 0)), tok, 32, GLOBAL_BATCH)
    search = ParetoSearch(
        space, eval_batches=[batches(0)], proposals_per_epoch=2, candidates=16, segments=2
    )
    return model, batches, _configs(space), search


def run_training(out_dir: Path, stop_after: int | None = None) -> CoALoRAModel:
    model, batches, configs, search = build()
    train(
        model,
        batches,
        configs,
        steps=STEPS,
        out_dir=out_dir,
        steps_per_epoch=STEPS_PER_EPOCH,
        on_epoch_end=search,
        checkpoint_every=STEPS_PER_EPOCH,
        stop_after=stop_after,
        progress=False,
    )
    return model


def sweep_metrics(model: CoALoRAModel) -> list[float]:
    _, batches, configs, _ = build()
    points = evaluate_sweep(model, [(c, "test") for c in configs], [batches(1)], progress=False)
    return [p.entry.metric for p in points]


def rank_main(rank: int, world: int, port: int, root: str) -> None:
    """One rank: a run stopped at its first checkpoint (kept as ``part``), then resumed by the
    same ranks to the end (``full``), and the sweep."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        out = Path(root)
        run_training(out / "full", stop_after=STEPS_PER_EPOCH)
        if rank == 0:
            shutil.copytree(out / "full", out / "part")
        torch.distributed.barrier()
        model = run_training(out / "full")
        metrics = sweep_metrics(model)
        if rank == 0:
            (out / "sweep.json").write_text(json.dumps(metrics))
        torch.distributed.barrier()  # no rank tears its pairs down while another still talks
    finally:
        torch.distributed.destroy_process_group()


def log(train_dir: Path) -> list[dict]:
    lines = (train_dir / "train_log.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]
