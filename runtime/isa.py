"""Which quantization options this CPU runs slowly, and how we know what CPU it is.

onnxruntime's MatMulNBits has a packed kernel for an option only where MLAS implements one for
the CPU's instructions; elsewhere it dequantizes the whole matrix to fp32 on every call and
runs an fp32 GEMM (natively 43-88x the packed 4-bit kernel, measured on x86 where 2 and 8 bits
take that path at accuracy level 0). On an Armv8.0 core without the dot-product instructions
(Cortex-A72: Raspberry Pi 4) that is every 2- and 8-bit option at accuracy level 4; with dot
product (Cortex-A76: Pi 5) and on x86 every shipped option has a kernel. Measured by
``make bench-arm-paths`` (benchmarks/results/arm_paths.md: the path is told by whether the
session reads the codes again on every call), which also cites the MLAS dispatch behind it.

A CPU is named by a *device class*:

- ``armv8.0``: arm64 without ``asimddp`` (Cortex-A53/A55 without it, A57, A72)
- ``armv8.2-dotprod``: arm64 with ``asimddp`` (A76, Neoverse, Apple)
- ``x86-64``: x86 (AVX2 / AVX-512; fast unless measured otherwise)
- ``any``: treat every option as fast (plan without regard to the CPU)

With ``--profile`` the class comes from the board's profile; otherwise the runtime asks the
CPU: HWCAP through ``getauxval`` (what onnxruntime itself reads), then ``/proc/cpuinfo``'s
``Features`` line.
"""

from __future__ import annotations

import ctypes
import platform
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from coalora.kernels.options import QuantOption

DEVICE_CLASSES: tuple[str, ...] = ("armv8.0", "armv8.2-dotprod", "x86-64", "any")

# (device class, accuracy level) -> bit-widths MatMulNBits runs by dequantizing the whole
# matrix on every call (every block size alike). Measured: benchmarks/results/arm_paths.md.
# Level 0 (fp32 activations) sends 2 and 8 bits there on every CPU; it is a parity check, not
# a serving mode, so the selection only applies the level-4 rows.
SLOW_BITS: Mapping[tuple[str, int], frozenset[int]] = {
    ("armv8.0", 4): frozenset({2, 8}),
    ("armv8.2-dotprod", 4): frozenset(),
    ("x86-64", 4): frozenset(),
    ("any", 4): frozenset(),
}

_AT_HWCAP = 16
_HWCAP_ASIMDDP = 1 << 20  # arch/arm64/include/uapi/asm/hwcap.h


class DeviceClassError(ValueError):
    """An unknown device class name."""


@dataclass(frozen=True)
class CpuClass:
    """A device class and where it came from (for the user: ``--dry-run`` prints it)."""

    name: str
    source: str  # "profile rpi4-2gb", "HWCAP", "/proc/cpuinfo", "--device-class", ...
    # bit-widths slow at accuracy level 4 when known better than the table (a profile's
    # "slow_bits", measured on the board itself)
    slow_override: frozenset[int] | None = None

    def slow_bits(self, accuracy_level: int = 4) -> frozenset[int]:
        if self.slow_override is not None and accuracy_level == 4:
            return self.slow_override
        return SLOW_BITS.get((self.name, accuracy_level), frozenset())

    def is_slow(self, option: QuantOption, accuracy_level: int = 4) -> bool:
        return option.bits in self.slow_bits(accuracy_level)

    def describe(self) -> str:
        return f"{self.name} ({self.source})"


def check_device_class(name: str) -> str:
    if name not in DEVICE_CLASSES:
        raise DeviceClassError(f"unknown device class {name!r}; known: {', '.join(DEVICE_CLASSES)}")
    return name


def class_from_features(machine: str, features: Iterable[str]) -> str:
    """The device class of an ``machine`` ("aarch64", "x86_64") CPU with these feature flags
    (``/proc/cpuinfo`` / profile spelling: ``asimddp`` or ``dotprod`` mean dot product)."""
    m = machine.lower()
    if m in ("aarch64", "arm64") or m.startswith("armv8"):
        return "armv8.2-dotprod" if {"asimddp", "dotprod"} & set(features) else "armv8.0"
    if m in ("x86_64", "amd64", "x86-64") or m.startswith("x86-64"):
        return "x86-64"
    return "any"


def _hwcap() -> int | None:
    try:
        libc = ctypes.CDLL(None)
        getauxval = libc.getauxval
    except (OSError, AttributeError):
        return None
    getauxval.restype = ctypes.c_ulong
    getauxval.argtypes = [ctypes.c_ulong]
    return int(getauxval(_AT_HWCAP))


def cpuinfo_features(text: str) -> set[str]:
    """The union of the ``Features`` (arm64) / ``flags`` (x86) lines of a ``/proc/cpuinfo``."""
    out: set[str] = set()
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("features", "flags"):
            out.update(value.split())
    return out


def detect(
    machine: str | None = None,
    hwcap: int | None = -1,
    cpuinfo: Path = Path("/proc/cpuinfo"),
) -> CpuClass:
    """This CPU's class. ``machine`` / ``hwcap`` / ``cpuinfo`` replace what is read (tests);
    ``hwcap=None`` means no HWCAP is available."""
    machine = machine or platform.machine()
    arm = class_from_features(machine, ()) == "armv8.0"
    if not arm:
        return CpuClass(class_from_features(machine, ()), f"machine {machine}")
    value = _hwcap() if hwcap == -1 else hwcap
    if value:  # 0: a kernel that passed no HWCAP (or a stub); try cpuinfo
        dot = bool(value & _HWCAP_ASIMDDP)
        return CpuClass("armv8.2-dotprod" if dot else "armv8.0", "HWCAP")
    try:
        feats = cpuinfo_features(cpuinfo.read_text(encoding="utf-8", errors="replace"))
    except OSError:
        feats = set()
    if feats:
        return CpuClass(class_from_features(machine, feats), str(cpuinfo))
    return CpuClass("armv8.0", "assumed: no HWCAP or /proc/cpuinfo features")
