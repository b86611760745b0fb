"""What every benchmark shares: where results go, the machine description, the report header,
reading a committed result back for ``--report-only``, and the median of interleaved rounds.

Every benchmark writes ``benchmarks/results/<name>.json`` (the figures) and renders
``<name>.md`` from that JSON alone, so ``--report-only`` regenerates a committed report
byte for byte (``git diff --exit-code benchmarks/results`` after it checks that).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
SHARED_MACHINE = "the machine was shared with other jobs; times are rough"
DEFAULT_PACKAGES = ("coalora", "numpy", "scipy", "torch", "transformers", "gguf")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions(packages: tuple[str, ...]) -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def machine(packages: tuple[str, ...] = DEFAULT_PACKAGES) -> dict[str, Any]:
    """The machine a result was measured on: CPU, cores, RAM, kernel and package versions."""
    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "platform": platform.platform(),
        "versions": versions(packages),
        "kernel": platform.release(),
    }
    try:
        import psutil

        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["ram_gb"] = round(psutil.virtual_memory().total / 1e9, 1)
    except ImportError:
        pass
    return info


def machine_md(
    info: dict[str, Any], command: str, wall_s: float, load: str | None = SHARED_MACHINE
) -> list[str]:
    """Markdown lines naming the command, machine and versions; ``load`` says how loaded the
    machine was during the run (None: say nothing)."""
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    return [
        f"- command: `{command}`",
        f"- machine: {info['cores']} cores, {info['cpu']} ({info['platform']})",
        f"- versions: {versions}",
        f"- wall time: {wall_s:.0f} s" + (f" ({load})" if load else ""),
    ]


def with_summary(payload: dict[str, Any], summary: dict[str, Any]) -> dict[str, Any]:
    """``payload`` with ``summary`` as its first key: the figures a reader looks for first,
    computed from the payload itself by the benchmark's ``summary`` function."""
    return {"summary": summary, **{k: v for k, v in payload.items() if k != "summary"}}


def read_result(path: Path) -> dict[str, Any]:
    """A committed result JSON, for ``--report-only``."""
    if not path.is_file():
        raise SystemExit(f"no result at {path}: run the benchmark first")
    return json.loads(path.read_text(encoding="utf-8"))


def median(xs: list[float]) -> float:
    """The median of interleaved rounds (the figure every speed comparison quotes)."""
    return float(np.median(xs)) if xs else float("nan")


def interleaved(
    runs: Mapping[str, Callable[[], dict[str, float]]],
    order: list[str],
    rounds: int,
    gap_s: float,
    after_round: Callable[[int, dict[str, list[dict[str, float]]]], None] | None = None,
) -> dict[str, list[dict[str, float]]]:
    """Every run once per round, in ``order``, round after round, so a change in machine load
    hits all of them alike: compare them as ratios within a round. ``gap_s`` of idle before
    each run lets the previous run's spinning threads go idle. Each result gets ``load1``."""
    out: dict[str, list[dict[str, float]]] = {k: [] for k in runs}
    for r in range(rounds):
        for key in order:
            time.sleep(gap_s)
            res = runs[key]()
            res["load1"] = os.getloadavg()[0]
            out[key].append(res)
        if after_round is not None:
            after_round(r, out)
    return out


def report_only_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's argument parser with ``--report-only``."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    p.add_argument(
        "--report-only", action="store_true", help="rewrite the report from the committed .json"
    )
    return p
