"""Signals of memory pressure beyond free bytes: PSI and the cgroup's ``memory.events``.

Free memory says how much is left; these say whether the kernel is already struggling:

- PSI (``/proc/pressure/memory``, or the cgroup's ``memory.pressure``): ``some avg10`` is the
  share of the last 10 s in which some task stalled waiting for memory, in percent.
- cgroup v2 ``memory.events``: counters of the times the cgroup hit ``memory.high``
  (``high``), hit ``memory.max`` and reclaimed (``max``), or killed (``oom_kill``). A counter
  that grew since the last sample means the limit is being hit now.

Both are optional: a kernel without PSI, or a process outside a cgroup v2, reads as None.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from coalora.runtime.probe import (
    DEFAULT_CGROUP_ROOT,
    DEFAULT_PROC_ROOT,
    _cgroup_dirs,
    _read_memberships,
)

EVENT_KEYS = ("high", "max", "oom", "oom_kill")


@dataclass(frozen=True)
class Pressure:
    psi_some_avg10: float | None  # percent of the last 10 s with a task stalled on memory
    events: dict[str, int] | None  # summed memory.events counters of the cgroup and ancestors


def _read_psi(path: Path) -> float | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "some":
            for f in fields[1:]:
                key, _, value = f.partition("=")
                if key == "avg10":
                    try:
                        return float(value)
                    except ValueError:
                        return None
    return None


def _read_events(path: Path) -> dict[str, int] | None:
    try:
        text = path.read_text()
    except OSError:
        return None
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, _, value = line.partition(" ")
        if key in EVENT_KEYS:
            try:
                out[key] = int(value)
            except ValueError:
                continue
    return out


def read_pressure(
    *,
    cgroup_root: Path | str = DEFAULT_CGROUP_ROOT,
    proc_root: Path | str = DEFAULT_PROC_ROOT,
) -> Pressure:
    """PSI and ``memory.events`` for this process (the cgroup's own PSI when it has one)."""
    cgroup_root, proc_root = Path(cgroup_root), Path(proc_root)
    membership = _read_memberships(proc_root / "self" / "cgroup").get("v2")
    psi: float | None = None
    events: dict[str, int] | None = None
    if membership is not None:
        for d in _cgroup_dirs(cgroup_root, membership):
            if psi is None:
                psi = _read_psi(d / "memory.pressure")
            found = _read_events(d / "memory.events")
            if found is not None:
                events = events or {}
                for k, v in found.items():
                    events[k] = events.get(k, 0) + v
    if psi is None:
        psi = _read_psi(proc_root / "pressure" / "memory")
    return Pressure(psi_some_avg10=psi, events=events)
