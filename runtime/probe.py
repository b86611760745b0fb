"""How much memory this process may still use, and how many cores it should run on.

``available_memory()`` is what ``--budget auto`` means. psutil's "available" is the machine's
view; a container or a shell limit can be far tighter, and the process is killed at the
tightest one. So the headroom is the minimum of:

- ``psutil.virtual_memory().available``
- cgroup v2: ``memory.max - memory.current`` for the process's cgroup and each ancestor
  ("max" means no limit)
- cgroup v1: ``memory.limit_in_bytes - memory.usage_in_bytes``, same walk (the kernel writes
  a huge number, ~2^63, for "no limit")
- ``RLIMIT_AS`` (soft) minus the process's current virtual size

and the budget is that headroom minus a reserve, by default ``max(256 MiB, 10% of the
headroom)``: room for the page cache of memory-mapped weights, allocator slack, and whatever
else the device runs next to us.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import psutil

MIN_RESERVE_BYTES = 256 * 2**20
RESERVE_FRACTION = 0.10
# cgroup v1 reports "unlimited" as PAGE_COUNTER_MAX * page size (~2^63); anything this large
# is no limit on any real machine.
CGROUP_V1_UNLIMITED = 2**60

# Where cgroupfs is mounted; COALORA_CGROUP_ROOT names another place (a container that mounts
# it elsewhere, or benchmarks/serve.py's emulated limit).
DEFAULT_CGROUP_ROOT = Path(os.environ.get("COALORA_CGROUP_ROOT", "/sys/fs/cgroup"))
DEFAULT_PROC_ROOT = Path("/proc")


@dataclass(frozen=True)
class MemoryProbe:
    """The numbers behind an ``auto`` budget; ``available_bytes`` is the one to plan with."""

    available_bytes: int
    headroom_bytes: int
    reserve_bytes: int
    system_available_bytes: int
    cgroup_v2_bytes: int | None
    cgroup_v1_bytes: int | None
    rlimit_bytes: int | None
    limited_by: str  # "system", "cgroup v2", "cgroup v1" or "rlimit"

    def describe(self) -> str:
        mb = 1e6
        return (
            f"{self.available_bytes / mb:.1f} MB usable: {self.headroom_bytes / mb:.1f} MB free "
            f"(limited by {self.limited_by}) minus a {self.reserve_bytes / mb:.1f} MB reserve"
        )


def default_reserve(headroom_bytes: int) -> int:
    return max(MIN_RESERVE_BYTES, int(RESERVE_FRACTION * headroom_bytes))


def available_memory(
    reserve_bytes: int | None = None,
    *,
    cgroup_root: Path | str = DEFAULT_CGROUP_ROOT,
    proc_root: Path | str = DEFAULT_PROC_ROOT,
) -> MemoryProbe:
    """Probe the memory this process may still allocate; see the module docstring."""
    if reserve_bytes is not None and reserve_bytes < 0:
        raise ValueError(f"reserve_bytes must be >= 0, got {reserve_bytes}")
    cgroup_root = Path(cgroup_root)
    memberships = _read_memberships(Path(proc_root) / "self" / "cgroup")

    system = int(psutil.virtual_memory().available)
    v2 = _cgroup_v2_headroom(cgroup_root, memberships.get("v2"))
    v1 = _cgroup_v1_headroom(cgroup_root, memberships.get("memory"))
    rlimit = _rlimit_headroom()

    candidates = [("system", system), ("cgroup v2", v2), ("cgroup v1", v1), ("rlimit", rlimit)]
    limited_by, headroom = min(
        ((name, value) for name, value in candidates if value is not None),
        key=lambda item: item[1],
    )
    headroom = max(0, headroom)
    reserve = default_reserve(headroom) if reserve_bytes is None else reserve_bytes
    return MemoryProbe(
        available_bytes=max(0, headroom - reserve),
        headroom_bytes=headroom,
        reserve_bytes=reserve,
        system_available_bytes=system,
        cgroup_v2_bytes=v2,
        cgroup_v1_bytes=v1,
        rlimit_bytes=rlimit,
        limited_by=limited_by,
    )


def physical_cores() -> int:
    """Physical cores this process may run on: the thread count for the kernels.

    psutil's physical count, falling back to the logical count (some ARM boards and VMs do not
    report cores), and never more than the CPUs the process is pinned to (a container limited
    to two CPUs on a large host should not start one thread per host core).
    """
    cores = psutil.cpu_count(logical=False) or psutil.cpu_count(logical=True) or 1
    try:
        pinned = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        pinned = 0
    if pinned:
        cores = min(cores, pinned)
    return max(1, int(cores))


def usable_cpus() -> int:
    """Logical CPUs this process may run on (its affinity mask): the most threads worth
    starting."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, psutil.cpu_count(logical=True) or 1)


# -- cgroups ------------------------------------------------------------------------------------
def _read_memberships(path: Path) -> dict[str, str]:
    """``/proc/self/cgroup`` -> {"v2": path, "memory": v1 memory path} (whichever exist)."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    out: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, cgroup_path = parts
        if hierarchy == "0" and controllers == "":
            out["v2"] = cgroup_path
        elif "memory" in controllers.split(","):
            out["memory"] = cgroup_path
    return out


def _cgroup_dirs(base: Path, cgroup_path: str) -> Iterator[Path]:
    """The process's cgroup directory under ``base`` and its ancestors up to ``base``.

    Inside a container without a cgroup namespace, ``/proc/self/cgroup`` names the host's
    path while the container sees its own cgroup mounted at ``base``; then only ``base``
    itself is checked.
    """
    if not base.is_dir():
        return
    leaf = base
    parts = PurePosixPath(cgroup_path.strip()).parts
    if parts and parts[0] == "/" and ".." not in parts and (base.joinpath(*parts[1:])).is_dir():
        leaf = base.joinpath(*parts[1:])
    d = leaf
    while True:
        yield d
        if d == base:
            return
        d = d.parent


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _cgroup_v2_headroom(root: Path, cgroup_path: str | None) -> int | None:
    if cgroup_path is None:
        return None
    best: int | None = None
    # Unified hierarchy at the root; hybrid systems mount it at <root>/unified.
    for base in (root, root / "unified"):
        for d in _cgroup_dirs(base, cgroup_path):
            try:
                limit_text = (d / "memory.max").read_text().strip()
            except OSError:
                continue
            if limit_text == "max":
                continue
            current = _read_int(d / "memory.current")
            try:
                limit = int(limit_text)
            except ValueError:
                continue
            if current is None:
                continue
            headroom = max(0, limit - current)
            best = headroom if best is None else min(best, headroom)
    return best


def _cgroup_v1_headroom(root: Path, cgroup_path: str | None) -> int | None:
    if cgroup_path is None:
        return None
    best: int | None = None
    for d in _cgroup_dirs(root / "memory", cgroup_path):
        limit = _read_int(d / "memory.limit_in_bytes")
        if limit is None or limit >= CGROUP_V1_UNLIMITED:
            continue
        usage = _read_int(d / "memory.usage_in_bytes")
        if usage is None:
            continue
        headroom = max(0, limit - usage)
        best = headroom if best is None else min(best, headroom)
    return best


# -- address-space limit ------------------------------------------------------------------------
def _rlimit_headroom() -> int | None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    vms = int(psutil.Process().memory_info().vms)
    return max(0, soft - vms)
