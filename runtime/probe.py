"""How much memory this process may still use, and how many cores it should run on.

``available_memory()`` is what ``--budget auto`` means, and the ceiling on every other kind
of budget. psutil's "available" is the machine's view; a container can be far tighter, and
the process is killed at the tightest limit. So the free memory (``headroom_bytes``) is the
minimum of:

- ``psutil.virtual_memory().available`` (the kernel's estimate: free plus reclaimable cache)
- cgroup v2: ``memory.max - (memory.current - reclaimable)`` for the process's cgroup and
  each ancestor ("max" means no limit), reclaimable being ``memory.stat``'s ``file`` minus
  ``shmem``: page cache (of files just hashed, say) is dropped before the limit is enforced
- cgroup v1: ``memory.limit_in_bytes - (memory.usage_in_bytes - reclaimable)``, same walk
  (the kernel writes a huge number, ~2^63, for "no limit"), reclaimable being
  ``total_cache - total_shmem``

``available_bytes`` is that headroom minus a small reserve (``default_reserve``).

A memory plan (``plan.py``) counts the whole process, so it is compared with
``plan_limit_bytes``: the available bytes plus what this process already holds and the
headroom counted as used (its anonymous pages; its file pages are page cache, counted free
already). ``RLIMIT_AS`` (``ulimit -v``) limits address space, not memory: its headroom (soft
limit minus the current virtual size) is ``rlimit_bytes``, and the plan's
``address_space_bytes`` must fit it.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import psutil

# What the plan does not count and the device may still take while we start. The plan itself
# is the upper bound: on the demo bundle (benchmarks/results/robustness.md) a fresh process
# peaked at 0.90-0.92 of its plan at every stored configuration, and two runs of one
# configuration differed by up to 13 MB. So a small reserve, not the 256 MiB this once was.
MIN_RESERVE_BYTES = 16 * 2**20
RESERVE_FRACTION = 0.02
# cgroup v1 reports "unlimited" as PAGE_COUNTER_MAX * page size (~2^63); anything this large
# is no limit on any real machine.
CGROUP_V1_UNLIMITED = 2**60

# Where cgroupfs is mounted; COALORA_CGROUP_ROOT names another place (a container that mounts
# it elsewhere, or benchmarks/serve.py's emulated limit).
DEFAULT_CGROUP_ROOT = Path(os.environ.get("COALORA_CGROUP_ROOT", "/sys/fs/cgroup"))
DEFAULT_PROC_ROOT = Path("/proc")


@dataclass(frozen=True)
class MemoryProbe:
    """The numbers behind an ``auto`` budget. ``available_bytes``: what may still be
    allocated; ``plan_limit_bytes``: what a whole-process plan may total."""

    available_bytes: int
    headroom_bytes: int
    reserve_bytes: int
    system_available_bytes: int
    cgroup_v2_bytes: int | None
    cgroup_v1_bytes: int | None
    rlimit_bytes: int | None  # address space left under RLIMIT_AS, if one is set
    limited_by: str  # "system", "cgroup v2" or "cgroup v1"
    process_bytes: int = 0  # this process's anonymous RSS, counted as used in the headroom

    @property
    def plan_limit_bytes(self) -> int:
        """The most a whole-process memory plan may total here."""
        return self.available_bytes + self.process_bytes

    def describe(self) -> str:
        mb = 1e6
        text = (
            f"{self.available_bytes / mb:.1f} MB usable: {self.headroom_bytes / mb:.1f} MB free "
            f"(limited by {self.limited_by}) minus a {self.reserve_bytes / mb:.1f} MB reserve"
        )
        if self.rlimit_bytes is not None:
            text += f"; {self.rlimit_bytes / mb:.1f} MB of address space left (RLIMIT_AS)"
        return text


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

    candidates = [("system", system), ("cgroup v2", v2), ("cgroup v1", v1)]
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
        process_bytes=_anonymous_rss(),
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


def _stat_fields(path: Path) -> dict[str, int]:
    """``memory.stat`` as {field: value}; empty when unreadable."""
    try:
        text = path.read_text()
    except OSError:
        return {}
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def _reclaimable(stat: dict[str, int], cache: tuple[str, ...], shmem: tuple[str, ...]) -> int:
    """Page cache the kernel drops before enforcing the limit: file pages, less shared memory
    (tmpfs, which has nowhere to go without swap). The first field present of each tuple."""
    file_bytes = next((stat[k] for k in cache if k in stat), 0)
    shmem_bytes = next((stat[k] for k in shmem if k in stat), 0)
    return max(0, file_bytes - shmem_bytes)


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
            cache = _reclaimable(_stat_fields(d / "memory.stat"), ("file",), ("shmem",))
            headroom = max(0, limit - max(0, current - cache))
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
        stat = _stat_fields(d / "memory.stat")
        cache = _reclaimable(stat, ("total_cache", "cache"), ("total_shmem", "shmem"))
        headroom = max(0, limit - max(0, usage - cache))
        best = headroom if best is None else min(best, headroom)
    return best


def _anonymous_rss() -> int:
    """This process's anonymous resident pages (RSS less file-backed pages): what a cgroup or
    the system counts as used by us and a whole-process plan counts again."""
    try:
        info = psutil.Process().memory_info()
    except (psutil.Error, OSError):
        return 0
    return max(0, int(info.rss) - int(getattr(info, "shared", 0)))


# -- address-space limit ------------------------------------------------------------------------
def _rlimit_headroom() -> int | None:
    soft, _hard = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY or soft < 0:
        return None
    vms = int(psutil.Process().memory_info().vms)
    return max(0, soft - vms)
