"""The memory probe: psutil clamped by cgroup v2 and v1 (page cache counted reclaimable),
minus a small reserve; RLIMIT_AS apart, as address space; the process's own anonymous pages
given back to a whole-process plan."""

from __future__ import annotations

import resource
from pathlib import Path
from types import SimpleNamespace

import pytest

from coalora.runtime import probe
from coalora.runtime.probe import (
    MIN_RESERVE_BYTES,
    RESERVE_FRACTION,
    available_memory,
    default_reserve,
    physical_cores,
)

GB = 10**9
MiB = 2**20


@pytest.fixture(autouse=True)
def _fake_system(monkeypatch: pytest.MonkeyPatch) -> None:
    """8 GB available, no address-space limit, unless a test says otherwise."""
    monkeypatch.setattr(probe.psutil, "virtual_memory", lambda: SimpleNamespace(available=8 * GB))
    monkeypatch.setattr(
        probe.resource,
        "getrlimit",
        lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY),
    )


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _proc(tmp_path: Path, content: str) -> Path:
    proc = tmp_path / "proc"
    _write(proc / "self" / "cgroup", content)
    return proc


def test_no_cgroup_files_means_psutil_minus_reserve(tmp_path: Path) -> None:
    got = available_memory(cgroup_root=tmp_path / "nope", proc_root=tmp_path / "nope")
    assert got.limited_by == "system"
    assert got.headroom_bytes == 8 * GB
    assert got.reserve_bytes == int(RESERVE_FRACTION * 8 * GB)
    assert got.available_bytes == 8 * GB - got.reserve_bytes
    assert got.cgroup_v1_bytes is None and got.cgroup_v2_bytes is None
    assert "limited by system" in got.describe()


def test_cgroup_v2_limit_below_psutil_clamps(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    leaf = root / "system.slice" / "app.service"
    _write(leaf / "memory.max", f"{2 * GB}\n")
    _write(leaf / "memory.current", f"{500 * 10**6}\n")
    proc = _proc(tmp_path, "0::/system.slice/app.service\n")
    got = available_memory(cgroup_root=root, proc_root=proc)
    assert got.limited_by == "cgroup v2"
    assert got.cgroup_v2_bytes == 2 * GB - 500 * 10**6
    assert got.headroom_bytes == 1_500_000_000
    assert got.reserve_bytes == default_reserve(1_500_000_000)
    assert got.available_bytes == 1_500_000_000 - got.reserve_bytes


def test_cgroup_v2_max_means_unlimited_but_a_parent_limit_counts(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    parent = root / "user.slice"
    leaf = parent / "session.scope"
    _write(leaf / "memory.max", "max\n")
    _write(leaf / "memory.current", "1000\n")
    proc = _proc(tmp_path, "0::/user.slice/session.scope\n")
    got = available_memory(cgroup_root=root, proc_root=proc)
    assert got.cgroup_v2_bytes is None
    assert got.limited_by == "system"

    _write(parent / "memory.max", f"{3 * GB}")
    _write(parent / "memory.current", f"{1 * GB}")
    got = available_memory(cgroup_root=root, proc_root=proc)
    assert got.cgroup_v2_bytes == 2 * GB
    assert got.limited_by == "cgroup v2"


def test_cgroup_v2_path_hidden_by_container_falls_back_to_mounted_root(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    _write(root / "memory.max", f"{1 * GB}")
    _write(root / "memory.current", f"{100 * 10**6}")
    proc = _proc(tmp_path, "0::/../../host/slice\n")
    got = available_memory(cgroup_root=root, proc_root=proc, reserve_bytes=0)
    assert got.cgroup_v2_bytes == 900 * 10**6
    assert got.available_bytes == 900 * 10**6
    # A host path the container does not see: the mounted root is the container's cgroup.
    proc = _proc(tmp_path, "0::/docker/0123abcd\n")
    assert available_memory(cgroup_root=root, proc_root=proc).cgroup_v2_bytes == 900 * 10**6


def test_cgroup_v1_limit_clamps(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    leaf = root / "memory" / "docker" / "abc"
    _write(leaf / "memory.limit_in_bytes", f"{1 * GB}\n")
    _write(leaf / "memory.usage_in_bytes", f"{200 * 10**6}\n")
    # The root of a v1 hierarchy reports "unlimited" as ~2^63 and system-wide usage.
    _write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")
    _write(root / "memory" / "memory.usage_in_bytes", f"{5 * GB}\n")
    proc = _proc(
        tmp_path,
        "12:pids:/docker/abc\n4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n0::/docker/abc\n",
    )
    got = available_memory(cgroup_root=root, proc_root=proc)
    assert got.limited_by == "cgroup v1"
    assert got.cgroup_v1_bytes == 800 * 10**6
    assert got.cgroup_v2_bytes is None
    assert got.available_bytes == 800 * 10**6 - default_reserve(800 * 10**6)


def test_cgroup_v1_huge_limit_means_unlimited(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    leaf = root / "memory" / "process_api" / "x"
    _write(leaf / "memory.limit_in_bytes", "9223372036854771712")
    _write(leaf / "memory.usage_in_bytes", "26431488")
    proc = _proc(tmp_path, "4:memory:/process_api/x\n0::/\n")
    got = available_memory(cgroup_root=root, proc_root=proc)
    assert got.cgroup_v1_bytes is None
    assert got.limited_by == "system"


def test_usage_above_limit_gives_zero_not_negative(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    _write(root / "memory.max", "1000")
    _write(root / "memory.current", "5000")
    got = available_memory(cgroup_root=root, proc_root=_proc(tmp_path, "0::/\n"))
    assert got.headroom_bytes == 0
    assert got.available_bytes == 0


def test_rlimit_as_is_address_space_left(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def getrlimit(which: int) -> tuple[int, int]:
        calls.append(which)
        return (3 * GB, resource.RLIM_INFINITY)

    monkeypatch.setattr(probe.resource, "getrlimit", getrlimit)
    fake_process = SimpleNamespace(memory_info=lambda: SimpleNamespace(vms=1 * GB, rss=0))
    monkeypatch.setattr(probe.psutil, "Process", lambda: fake_process)
    got = available_memory(cgroup_root=tmp_path, proc_root=tmp_path)
    assert calls == [resource.RLIMIT_AS]
    # Address space is not memory: it does not clamp the headroom, the plan's virtual size
    # is checked against it apart.
    assert got.limited_by == "system"
    assert got.rlimit_bytes == 2 * GB
    assert got.headroom_bytes == 8 * GB
    assert "address space" in got.describe()


def test_explicit_reserve(tmp_path: Path) -> None:
    got = available_memory(100 * 10**6, cgroup_root=tmp_path, proc_root=tmp_path)
    assert got.reserve_bytes == 100 * 10**6
    assert got.available_bytes == 8 * GB - 100 * 10**6
    with pytest.raises(ValueError, match="reserve"):
        available_memory(-1, cgroup_root=tmp_path, proc_root=tmp_path)


def test_reserve_floor() -> None:
    assert probe.default_reserve(0) == MIN_RESERVE_BYTES
    assert probe.default_reserve(10 * GB) == int(RESERVE_FRACTION * 10 * GB)
    assert 32 * MiB >= MIN_RESERVE_BYTES  # a small margin: the plan is the upper bound


def test_cgroup_v1_page_cache_is_reclaimable(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    leaf = root / "memory" / "job"
    _write(leaf / "memory.limit_in_bytes", f"{700 * 10**6}")
    # 600 MB charged, 450 MB of it page cache (a bundle just hashed), 10 MB of it tmpfs
    _write(leaf / "memory.usage_in_bytes", f"{600 * 10**6}")
    _write(
        leaf / "memory.stat",
        f"cache 1\nrss 2\ntotal_cache {450 * 10**6}\ntotal_shmem {10 * 10**6}\n"
        f"total_inactive_file {300 * 10**6}\n",
    )
    proc = _proc(tmp_path, "4:memory:/job\n")
    got = available_memory(cgroup_root=root, proc_root=proc, reserve_bytes=0)
    assert got.cgroup_v1_bytes == 700 * 10**6 - (600 - 440) * 10**6


def test_cgroup_v2_page_cache_is_reclaimable(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    _write(root / "app" / "memory.max", f"{700 * 10**6}")
    _write(root / "app" / "memory.current", f"{600 * 10**6}")
    _write(root / "app" / "memory.stat", f"anon 1\nfile {500 * 10**6}\nshmem 0\n")
    got = available_memory(
        cgroup_root=root, proc_root=_proc(tmp_path, "0::/app\n"), reserve_bytes=0
    )
    assert got.cgroup_v2_bytes == 600 * 10**6


def test_plan_limit_gives_the_process_its_own_pages_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The headroom counts our anonymous pages as used; a whole-process plan counts them too.
    info = SimpleNamespace(rss=300 * 10**6, shared=100 * 10**6, vms=GB)
    monkeypatch.setattr(probe.psutil, "Process", lambda: SimpleNamespace(memory_info=lambda: info))
    got = available_memory(cgroup_root=tmp_path, proc_root=tmp_path, reserve_bytes=0)
    assert got.process_bytes == 200 * 10**6
    assert got.plan_limit_bytes == 8 * GB + 200 * 10**6


def test_real_machine_probe_is_sane() -> None:
    # The autouse fixture fakes psutil; this only checks the real files parse without error.
    got = available_memory()
    assert 0 <= got.available_bytes <= got.headroom_bytes <= 8 * GB


def test_physical_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(probe.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(probe.psutil, "cpu_count", lambda logical=True: None if not logical else 8)
    assert physical_cores() == 4  # falls back to logical (8), capped by the affinity mask
    monkeypatch.setattr(probe.psutil, "cpu_count", lambda logical=True: 2 if not logical else 4)
    assert physical_cores() == 2
    monkeypatch.setattr(probe.psutil, "cpu_count", lambda logical=True: None)
    assert physical_cores() == 1
