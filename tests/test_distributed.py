"""Data-parallel training over torch.distributed (gloo, 2 processes on this CPU) against one
process with the same global batch: the same configurations drawn and the same loss per step
(within 1e-5 relative), for a 2-process run stopped at a checkpoint and resumed by 2
processes and for one resumed by a single process, and the sweep's scoring shared out over
the ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch.multiprocessing as mp
from dist_runs import (
    STEPS,
    STEPS_PER_EPOCH,
    free_port,
    log,
    rank_main,
    run_training,
    sweep_metrics,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")
REL = 1e-5


def _same_steps(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b, strict=True):
        assert ra["drawn"] == rb["drawn"], ra["step"]  # identical configurations
        assert [x["bits"] for x in ra["losses"]] == [x["bits"] for x in rb["losses"]]
        for la, lb in zip(ra["losses"], rb["losses"], strict=True):
            assert la["loss"] == pytest.approx(lb["loss"], rel=REL), ra["step"]
        assert ra.get("config_set_size") == rb.get("config_set_size")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dist2")
    mp.spawn(rank_main, args=(2, free_port(), str(root)), nprocs=2, join=True)
    return root


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> tuple[Path, list[float]]:
    root = tmp_path_factory.mktemp("dist1")
    model = run_training(root / "train")
    return root / "train", sweep_metrics(model)


def test_two_processes_train_and_resume_as_one(two_ranks: Path, one_rank) -> None:
    one, two = log(one_rank[0]), log(two_ranks / "full")
    assert len(one) == STEPS
    assert any("config_set_size" in r for r in one)  # the search ran between epochs
    _same_steps(two, one)


def test_resumed_with_another_world_size(two_ranks: Path, one_rank) -> None:
    # the 2-process run stopped at its first checkpoint; one process carries it on
    part = two_ranks / "part"
    assert [r["step"] for r in log(part)] == list(range(1, STEPS_PER_EPOCH + 1))
    run_training(part)
    _same_steps(log(part), log(one_rank[0]))


def test_sweep_shared_over_ranks(two_ranks: Path, one_rank) -> None:
    two = json.loads((two_ranks / "sweep.json").read_text())
    assert two == pytest.approx(one_rank[1], rel=1e-4)
