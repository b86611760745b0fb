"""CPU class detection (HWCAP, /proc/cpuinfo, profiles) and the selection that avoids options
a CPU runs slowly."""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest

from coalora.kernels import ConfigSpace, MatrixSpec, QuantOption
from coalora.runtime import isa
from coalora.runtime.budget import parse_budget
from coalora.runtime.format.pareto import ParetoEntry, ParetoSet
from coalora.runtime.isa import CpuClass, DeviceClassError, class_from_features, detect
from coalora.runtime.plan import MemoryPlan
from coalora.runtime.profiles import ProfileError, load_profile
from coalora.runtime.selection import select

A72_CPUINFO = "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU part\t: 0xd08\n"
A76_CPUINFO = (
    "processor\t: 0\nFeatures\t: fp asimd evtstrm crc32 atomics fphp asimdhp cpuid "
    "asimdrdm lrcpc dcpop asimddp\nCPU part\t: 0xd0b\n"
)


def test_class_from_features() -> None:
    assert class_from_features("aarch64", ["fp", "asimd"]) == "armv8.0"
    assert class_from_features("aarch64", ["asimd", "asimddp"]) == "armv8.2-dotprod"
    assert class_from_features("armv8.2-a", ["neon", "dotprod"]) == "armv8.2-dotprod"
    assert class_from_features("armv8-a", ["neon", "crc32"]) == "armv8.0"
    assert class_from_features("x86_64", ["avx2"]) == "x86-64"
    assert class_from_features("x86-64-v4", []) == "x86-64"
    assert class_from_features("riscv64", []) == "any"


def test_detect_reads_hwcap_first(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(A76_CPUINFO)  # contradicts HWCAP: HWCAP wins (onnxruntime reads it)
    a72 = detect("aarch64", hwcap=0b10 | 0b1, cpuinfo=info)  # fp, asimd
    assert (a72.name, a72.source) == ("armv8.0", "HWCAP")
    a76 = detect("aarch64", hwcap=(1 << 20) | 0b11, cpuinfo=info)
    assert (a76.name, a76.source) == ("armv8.2-dotprod", "HWCAP")


def test_detect_falls_back_to_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text(A72_CPUINFO)
    assert detect("aarch64", hwcap=None, cpuinfo=info).name == "armv8.0"
    info.write_text(A76_CPUINFO)
    got = detect("aarch64", hwcap=0, cpuinfo=info)
    assert (got.name, got.source) == ("armv8.2-dotprod", str(info))
    nothing = detect("aarch64", hwcap=None, cpuinfo=tmp_path / "missing")
    assert nothing.name == "armv8.0" and nothing.source.startswith("assumed")


def test_detect_x86_and_this_machine() -> None:
    assert detect("x86_64").name == "x86-64"
    here = detect()
    assert here.name in isa.DEVICE_CLASSES
    if platform.machine() == "x86_64":
        assert here.slow_bits() == frozenset()


def test_slow_table() -> None:
    for (name, level), bits in isa.SLOW_BITS.items():
        assert name in isa.DEVICE_CLASSES and level == 4 and bits <= {2, 4, 8}
    assert CpuClass("any", "test").slow_bits() == frozenset()
    board = CpuClass("armv8.0", "test", slow_override=frozenset({2, 8}))
    assert board.slow_bits() == {2, 8}
    assert board.is_slow(QuantOption(8, 128)) and not board.is_slow(QuantOption(4, 32))
    # Level 0 is a parity check: nothing is avoided there.
    assert board.slow_bits(accuracy_level=0) == frozenset()
    with pytest.raises(DeviceClassError, match="unknown device class"):
        isa.check_device_class("armv9")


def test_profiles_name_their_class(tmp_path: Path) -> None:
    assert load_profile("rpi4-2gb").device_class == "armv8.0"
    assert load_profile("rpi4-4gb").device_class == "armv8.0"
    assert load_profile("rpi5-8gb").device_class == "armv8.2-dotprod"
    assert load_profile("ci-2core").device_class == "x86-64"
    data = json.loads(
        (Path(isa.__file__).parents[1] / "device_profiles" / "rpi5-8gb.json").read_text()
    )
    data.pop("device_class")
    path = tmp_path / "derived.json"
    path.write_text(json.dumps(data))
    assert load_profile(str(path)).device_class == "armv8.2-dotprod"  # from isa_features
    data["slow_bits"] = [8, 2]
    path.write_text(json.dumps(data))
    assert load_profile(str(path)).slow_bits == (2, 8)
    for bad in ({"slow_bits": [3]}, {"slow_bits": "8"}, {"device_class": "armv9"}):
        path.write_text(json.dumps({**data, **bad}))
        with pytest.raises(ProfileError, match="unknown device class|slow_bits"):
            load_profile(str(path))


# -- the selection rule -----------------------------------------------------------------------
SPACE = ConfigSpace([MatrixSpec("l0.q", 256, 256), MatrixSpec("l0.mlp", 512, 256)])


def _entry(options: dict[str, str], metric: float) -> ParetoEntry:
    c = SPACE.validate(options)
    return ParetoEntry(c, SPACE.bits(c), SPACE.nbytes(c), metric, True)


PARETO = ParetoSet(
    (
        _entry({"l0.q": "2b64", "l0.mlp": "2b64"}, 0.50),
        _entry({"l0.q": "4b32", "l0.mlp": "2b64"}, 0.70),
        _entry({"l0.q": "4b64", "l0.mlp": "4b64"}, 0.80),
        _entry({"l0.q": "8b32", "l0.mlp": "4b32"}, 0.88),
        _entry({"l0.q": "8b32", "l0.mlp": "8b32"}, 0.90),
    ),
    metric_name="accuracy",
)


def _plan(config) -> MemoryPlan:
    return MemoryPlan(SPACE.nbytes(config), 0, 0, 0, 0)


def _options(sel) -> set[str]:
    return {str(o) for o in sel.config.values()}


def test_selection_skips_slow_options() -> None:
    a72 = CpuClass("armv8.0", "profile rpi4-2gb", frozenset({2, 8}))
    fast = select(PARETO, parse_budget("10bits"), _plan, cpu=a72)
    assert _options(fast) == {"4b64"} and not fast.slow_fallback
    assert "skipped 4 that use 2/8-bit matrices, slow on armv8.0 (profile rpi4-2gb)" in (
        fast.reason
    )
    # The same budget on a CPU without slow options takes the best entry.
    for cpu in (None, CpuClass("armv8.2-dotprod", "HWCAP"), CpuClass("any", "--device-class")):
        best = select(PARETO, parse_budget("10bits"), _plan, cpu=cpu)
        assert _options(best) == {"8b32"} and "skipped" not in best.reason
    # Level 0 (a parity check) does not avoid anything.
    exact = select(PARETO, parse_budget("10bits"), _plan, cpu=a72, accuracy_level=0)
    assert _options(exact) == {"8b32"}


def test_selection_falls_back_and_says_so() -> None:
    a72 = CpuClass("armv8.0", "HWCAP", frozenset({2, 8}))
    sel = select(PARETO, parse_budget("3.6bits"), _plan, cpu=a72)  # only 2-bit entries fit
    assert sel.slow_fallback and "2b64" in _options(sel)
    assert sel.entry.metric == 0.70  # the best of what fits
    assert "nothing with fast options fits" in sel.reason and "armv8.0 (HWCAP)" in sel.reason
    # A byte ceiling applies before the CPU rule: a fast entry over it is never taken.
    tight = select(PARETO, parse_budget("10bits"), _plan, available_bytes=100_000, cpu=a72)
    assert tight.slow_fallback and tight.plan.total <= 100_000


# -- coalora-run ----------------------------------------------------------------------------
def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    from coalora.runtime.cli import main

    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


def test_dry_run_avoids_slow_options(tiny_llama_bundle: Path, capsys, tmp_path: Path) -> None:
    b = str(tiny_llama_bundle)
    # A board measured slow at 2 and 8 bits (its profile says so).
    data = json.loads(
        (Path(isa.__file__).parents[1] / "device_profiles" / "rpi4-2gb.json").read_text()
    )
    board = tmp_path / "board.json"
    board.write_text(json.dumps({**data, "slow_bits": [2, 8]}))
    code, out, _ = _run([b, "--profile", str(board), "--dry-run", "--json"], capsys)
    d = json.loads(out)
    assert code == 0 and set(d["options"]) == {"4b32"} and not d["slow_options_fallback"]
    assert d["cpu"] == "armv8.0 (profile rpi4-2gb)" and "skipped 3" in d["reason"]
    # A Pi 5 (dot product) avoids nothing.
    code, out, _ = _run([b, "--profile", "rpi5-8gb", "--dry-run", "--json"], capsys)
    assert code == 0 and "skipped" not in json.loads(out)["reason"]
    # Only 2-bit configurations fit 3.5 bits: taken anyway, and the dry run says so.
    code, _, err = _run([b, "--profile", str(board), "--budget", "3.5bits", "--dry-run"], capsys)
    assert code == 0 and "nothing with fast options fits" in " ".join(err.split())
    # --device-class replaces the profile's class.
    argv = [b, "--profile", str(board), "--device-class", "any", "--dry-run", "--json"]
    code, out, _ = _run(argv, capsys)
    d = json.loads(out)
    assert code == 0 and d["cpu"] == "any (--device-class)" and "skipped" not in d["reason"]
    code, out, err = _run([b, "--device-class", "armv9", "--dry-run"], capsys)
    assert code == 2 and out == "" and err.startswith("error: unknown device class")
    assert len(err.splitlines()) == 1
