"""What every benchmark shares: where results go, the machine description, the report header,
reading a committed result back for ``--report-only``, and the median of interleaved rounds.

Every benchmark writes ``benchmarks/results/<name>.json`` (the figures) and renders
``<name>.md`` from that JSON alone, so ``--report-only`` regenerates a committed report
byte for byte (``git diff --exit-code benchmarks/results`` after it checks that).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
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


def write_result(stem: str, res: dict[str, Any], markdown: str, indent: int = 2) -> None:
    """``RESULTS/stem.json`` (summary first) and ``stem.md``, each written whole or not at
    all (a temporary file renamed over the old one)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = with_summary(res, res["summary"])
    for name, text in (
        (f"{stem}.json", json.dumps(payload, indent=indent)),
        (f"{stem}.md", markdown),
    ):
        tmp = RESULTS / (name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(RESULTS / name)


def child_json(module: str, *args: str, what: str = "the child") -> dict[str, Any]:
    """Run ``python -m module --child args`` (a fresh process: its RSS and imports are its own)
    and return the JSON object its last stdout line holds; a failed child ends the benchmark
    with one error line and the tail of its stderr."""
    cmd = [sys.executable, "-m", module, "--child", *args]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"error: {what} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


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


# one process spinning on core 0: the app that shares a board's CPU with the runtime
BUSY_LOOP = "import os; os.sched_setaffinity(0, {0}); exec('while True: pass')"


@contextlib.contextmanager
def busy_core(settle_s: float = 1.0) -> Iterator[None]:
    """A busy loop pinned to one core for the duration of the block."""
    hog = subprocess.Popen([sys.executable, "-c", BUSY_LOOP])
    try:
        time.sleep(settle_s)
        yield
    finally:
        hog.kill()
        hog.wait()


def report_only_parser(doc: str | None) -> argparse.ArgumentParser:
    """A benchmark's argument parser with ``--report-only``."""
    p = argparse.ArgumentParser(description=(doc or "").split("\n")[0])
    p.add_argument(
        "--report-only", action="store_true", help="rewrite the report from the committed .json"
    )
    return p


# -- a memory cgroup of its own ----------------------------------------------------------------
@dataclass
class LimitedRun:
    """A command run under a memory cgroup limit: its exit, output and peak resident size."""

    returncode: int
    stdout: str
    stderr: str
    peak_rss_bytes: int  # the command's own peak RSS (getrusage of the child)
    limit_bytes: int
    cgroup: str  # "cgroup v1 <path>" or "cgroup v2 <path>"


def proc_status() -> dict[str, int]:
    """This process's resident memory in bytes: VmRSS, its peak VmHWM, and RSS split into
    anonymous and file-backed pages (RssAnon, RssFile)."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _vm_hwm(pid: int) -> int | None:
    """The peak RSS so far of process ``pid`` (VmHWM), or None once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def run_measured(
    cmd: list[str], timeout: float = 600, stdin: str | None = None, env: dict | None = None
) -> tuple[int, str, str, int]:
    """Run ``cmd``: (exit code, stdout, stderr, its peak RSS in bytes). A command past
    ``timeout`` is killed (exit -9).

    The peak is the process's VmHWM, read every 10 ms while it runs: getrusage's ru_maxrss of
    a child would include the parent's pages at fork (Linux keeps the high-water mark across
    exec), and VmHWM starts afresh with the new program.
    """
    import subprocess
    import tempfile

    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=err,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            env=env,
        )
        if stdin is not None:
            assert proc.stdin is not None
            try:
                proc.stdin.write(stdin.encode("utf-8", "surrogateescape"))
                proc.stdin.close()
            except BrokenPipeError:
                pass
        peak = 0
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            hwm = _vm_hwm(proc.pid)
            if hwm is not None:
                peak = max(peak, hwm)
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.01)
        out.seek(0)
        err.seek(0)
        return (
            int(proc.returncode),
            out.read().decode("utf-8", "replace"),
            err.read().decode("utf-8", "replace"),
            peak,
        )


def _own_cgroup_dirs() -> list[tuple[str, Path]]:
    """Where this process's memory cgroup lives: ("v1"|"v2", directory), v1 first."""
    out: list[tuple[str, Path]] = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return out
    root = Path("/sys/fs/cgroup")
    for line in lines:
        hierarchy, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        rel = path.strip().lstrip("/")
        if "memory" in controllers.split(","):
            out.insert(0, ("v1", root / "memory" / rel))
        elif hierarchy == "0" and controllers == "":
            out.append(("v2", root / rel))
    return out


def run_in_memory_cgroup(
    commands: list[list[str]], limit_bytes: int, timeout: float = 600
) -> LimitedRun | str:
    """Run ``commands`` one after another in a new child memory cgroup limited to
    ``limit_bytes`` (so what the first one reads is charged to it too); the last one's result.
    Returns the reason as a string when no cgroup can be made here (not root, no memory
    controller, a v2 parent that cannot delegate it)."""
    reasons = []
    for kind, parent in _own_cgroup_dirs():
        child = parent / f"coalora-limit-{os.getpid()}-{time.monotonic_ns()}"
        limit_file = "memory.limit_in_bytes" if kind == "v1" else "memory.max"
        try:
            if kind == "v2" and "memory" not in (parent / "cgroup.subtree_control").read_text():
                reasons.append(f"cgroup v2 {parent}: memory controller not delegated")
                continue
            child.mkdir()
        except OSError as exc:
            reasons.append(f"cgroup {kind} {parent}: {exc.strerror or exc}")
            continue
        try:
            (child / limit_file).write_text(str(limit_bytes))
            result: tuple[int, str, str, int] | None = None
            for cmd in commands:
                # The shell joins the cgroup, then becomes the command (same pid, so its
                # rusage is the command's).
                wrapped = ["sh", "-c", f'echo $$ > {child}/cgroup.procs && exec "$@"', "sh", *cmd]
                result = run_measured(wrapped, timeout)
            assert result is not None
            return LimitedRun(
                returncode=result[0],
                stdout=result[1],
                stderr=result[2],
                peak_rss_bytes=result[3],
                limit_bytes=limit_bytes,
                cgroup=f"cgroup {kind} {child}",
            )
        except OSError as exc:
            reasons.append(f"cgroup {kind} {child}: {exc.strerror or exc}")
        finally:
            for _ in range(50):  # the last task may take a moment to leave
                try:
                    child.rmdir()
                    break
                except OSError:
                    time.sleep(0.1)
    return "; ".join(reasons) or "no memory cgroup found for this process"
