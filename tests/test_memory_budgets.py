"""Budgets are honest about memory: an explicit budget above what the device can give is
clamped with a warning (or refused, naming what is available), ``ulimit -v`` is planned as
address space, and ``auto`` under a real cgroup limit serves within it."""

from __future__ import annotations

import json
import logging
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.common import run_in_memory_cgroup
from coalora.runtime import engine
from coalora.runtime.engine import Runtime
from coalora.runtime.probe import MemoryProbe, default_reserve
from coalora.runtime.selection import SelectionError

RUN = [sys.executable, "-m", "coalora.runtime.cli"]
SERVE = ["--prompt", "the news", "--max-tokens", "3", "--threads", "1", "--context", "64"]


def _probe(plan_limit: int, rlimit: int | None = None) -> MemoryProbe:
    return MemoryProbe(
        available_bytes=plan_limit,
        headroom_bytes=plan_limit,
        reserve_bytes=0,
        system_available_bytes=plan_limit,
        cgroup_v2_bytes=None,
        cgroup_v1_bytes=plan_limit,
        rlimit_bytes=rlimit,
        limited_by="cgroup v1",
    )


def _plans(bundle: Path) -> list[tuple[float, int, int]]:
    """(bits, plan total, address space) of every stored configuration, by plan."""
    rt = Runtime.open(bundle, budget="auto", build=False, threads=1, context_length=64)
    plans = [(e.bits, rt.plan(e.config)) for e in rt.pareto.entries]
    return sorted((b, p.total, p.address_space_bytes) for b, p in plans)


def test_explicit_budget_above_the_device_is_clamped_with_a_warning(
    tiny_llama_bundle: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    plans = _plans(tiny_llama_bundle)
    top = Runtime.open(tiny_llama_bundle, budget="32bits", build=False, context_length=64)
    wanted = top.selection.plan.total
    smaller = [p for p in plans if p[1] < wanted]
    assert smaller, "the tiny bundle needs two plan sizes"
    limit = max(p[1] for p in smaller)
    monkeypatch.setattr(engine, "available_memory", lambda: _probe(limit))
    with caplog.at_level(logging.WARNING, logger="coalora.runtime"):
        rt = Runtime.open(tiny_llama_bundle, budget="32bits", build=False, context_length=64)
    assert rt.selection.plan.total <= limit < wanted
    assert rt.selection.clamped_from is not None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and warnings[0].startswith("warning: the 32 bits budget asks")
    assert "available" in warnings[0] and "\n" not in warnings[0]

    # Byte budgets too, and nothing fitting is a refusal that names what is available.
    rt = Runtime.open(tiny_llama_bundle, budget="10GB", build=False, context_length=64)
    assert rt.selection.plan.total <= limit
    monkeypatch.setattr(engine, "available_memory", lambda: _probe(min(p[1] for p in plans) - 1))
    with pytest.raises(SelectionError, match="available"):
        Runtime.open(tiny_llama_bundle, budget="8bits", build=False, context_length=64)


def test_address_space_limit_clamps_by_the_plans_virtual_size(
    tiny_llama_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plans = _plans(tiny_llama_bundle)
    va = min(p[2] for p in plans)
    kw = dict(budget="32bits", build=False, context_length=64, threads=1)
    monkeypatch.setattr(engine, "available_memory", lambda: _probe(10**12, rlimit=va))
    rt = Runtime.open(tiny_llama_bundle, **kw)
    assert rt.selection.plan.address_space_bytes <= va
    monkeypatch.setattr(engine, "available_memory", lambda: _probe(10**12, rlimit=va - 1))
    with pytest.raises(SelectionError, match="RLIMIT_AS"):
        Runtime.open(tiny_llama_bundle, **kw)
    # Each intra-op thread reserves address space (an arena and a stack).
    monkeypatch.setattr(engine, "available_memory", lambda: _probe(10**12, rlimit=va))
    with pytest.raises(SelectionError, match="RLIMIT_AS"):
        Runtime.open(tiny_llama_bundle, **{**kw, "threads": 2})


def test_plan_counts_the_fused_copies_held_while_building(tiny_llama_bundle: Path) -> None:
    rt = Runtime.open(tiny_llama_bundle, budget="32bits", build=False, context_length=64)
    plan = rt.selection.plan
    assert plan.build_scratch_bytes == rt.accountant.fused_copy_bytes(rt.config)
    assert plan.total == sum(
        v for k, v in plan.to_dict().items() if k not in ("total", "address_space_bytes")
    )
    assert plan.address_space_bytes > plan.total - 64 * 2**20


@pytest.mark.parametrize("kib", [300_000, 2_000_000])
def test_ulimit_v_is_served_or_refused_never_a_crash(tiny_llama_bundle: Path, kib: int) -> None:
    cmd = shlex.join([*RUN, str(tiny_llama_bundle), "--budget", "32bits", *SERVE])
    proc = subprocess.run(
        ["bash", "-c", f"ulimit -v {kib}; exec {cmd}"], capture_output=True, text=True, timeout=120
    )
    assert "Traceback" not in proc.stderr and "bad_alloc" not in proc.stderr, proc.stderr
    if proc.returncode == 2:
        errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
        assert errors == proc.stderr.strip().splitlines()[-1:] and "RLIMIT_AS" in errors[0]
    else:
        assert proc.returncode == 0, proc.stderr
    if kib == 2_000_000:
        assert proc.returncode == 0, proc.stderr


def test_auto_in_a_real_cgroup_serves_within_the_limit(tiny_llama_bundle: Path) -> None:
    """A child memory cgroup with a limit a little above the smallest plan: ``auto`` picks a
    configuration whose plan fits the limit less the reserve, and the process's peak RSS
    stays under the limit. Skipped where no cgroup can be made (not root, no memory
    controller delegated)."""
    plans = _plans(tiny_llama_bundle)
    limit = plans[-1][1] + 48 * 2**20  # every configuration fits, with the reserve to spare
    run = run_in_memory_cgroup(
        [[*RUN, str(tiny_llama_bundle), "--budget", "auto", "--json", *SERVE]], limit, 120
    )
    if isinstance(run, str):
        pytest.skip(f"no memory cgroup can be made here: {run}")
    assert run.returncode == 0, run.stderr
    chosen = json.loads(run.stdout)["plan"]["total"]
    assert chosen <= limit - default_reserve(limit) + 2**20
    best = Runtime.open(tiny_llama_bundle, budget="32bits", build=False, context_length=64)
    assert chosen == best.selection.plan.total  # every configuration fits: the best of all
    assert run.peak_rss_bytes <= limit

    # Below the smallest plan: refused with one line and exit 2, not killed by the OOM killer.
    low = plans[0][1] - 8 * 2**20
    run = run_in_memory_cgroup(
        [[*RUN, str(tiny_llama_bundle), "--budget", "auto", *SERVE]], low, 120
    )
    assert not isinstance(run, str)
    assert run.returncode == 2, run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: no stored configuration fits")
