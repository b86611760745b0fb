"""Device profiles: the boards ``--profile`` knows, read from ``coalora.device_profiles``.

A profile lets a workstation plan for a device it is not running on (and lets tests and
benchmarks state their assumptions): its ``usable_ram_bytes`` becomes a byte budget.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from coalora.kernels.options import SUPPORTED_BITS
from coalora.runtime.budget import Budget
from coalora.runtime.isa import DeviceClassError, check_device_class, class_from_features

_PACKAGE = "coalora.device_profiles"


class ProfileError(ValueError):
    """An unknown or malformed device profile."""


@dataclass(frozen=True)
class DeviceProfile:
    name: str
    description: str
    ram_bytes: int
    usable_ram_bytes: int  # after the OS; the profile's notes say what was assumed
    cores: int
    threads: int
    isa: str  # e.g. "armv8-a", "armv8.2-a", "x86-64-v4"
    cpu: str  # e.g. "cortex-a72"
    isa_features: tuple[str, ...]  # e.g. ("neon", "dotprod")
    memory_bandwidth_gbs: float  # approximate sustained bandwidth
    notes: str
    # The CPU class that decides which options are slow (runtime.isa); from the profile's
    # "device_class", else from isa and isa_features.
    device_class: str = ""
    # bit-widths this board runs slowly at accuracy level 4, measured on it; None: the
    # device class's row of runtime.isa.SLOW_BITS
    slow_bits: tuple[int, ...] | None = None
    # a public key (PEM) every bundle served on this device must be signed with (a path;
    # relative paths are read from the profile file's folder); None: unsigned bundles serve
    trusted_key: str | None = None

    @property
    def has_dotprod(self) -> bool:
        return "dotprod" in self.isa_features

    def budget(self) -> Budget:
        """The byte budget this board gives a process: its usable RAM."""
        return Budget.nbytes(self.usable_ram_bytes, "MB")

    @classmethod
    def from_dict(
        cls, data: Any, source: str = "profile", base_dir: Path | None = None
    ) -> DeviceProfile:
        if not isinstance(data, dict):
            raise ProfileError(f"{source}: a profile must be a JSON object")

        def get(key: str, kind: type | tuple[type, ...]) -> Any:
            if key not in data:
                raise ProfileError(f"{source}: missing field {key!r}")
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ProfileError(f"{source}: field {key!r} has the wrong type: {value!r}")
            return value

        features = data.get("isa_features", [])
        if not isinstance(features, list) or not all(isinstance(f, str) for f in features):
            raise ProfileError(f"{source}: 'isa_features' must be a list of strings")
        profile = cls(
            name=get("name", str),
            description=get("description", str),
            ram_bytes=get("ram_bytes", int),
            usable_ram_bytes=get("usable_ram_bytes", int),
            cores=get("cores", int),
            threads=get("threads", int),
            isa=get("isa", str),
            cpu=str(data.get("cpu", "")),
            isa_features=tuple(features),
            memory_bandwidth_gbs=float(get("memory_bandwidth_gbs", (int, float))),
            notes=get("notes", str),
        )
        cls_name = data.get("device_class") or class_from_features(
            profile.isa, profile.isa_features
        )
        try:
            object.__setattr__(profile, "device_class", check_device_class(str(cls_name)))
        except DeviceClassError as exc:
            raise ProfileError(f"{source}: {exc}") from None
        slow = data.get("slow_bits")
        if slow is not None:
            if not isinstance(slow, list) or not all(b in SUPPORTED_BITS for b in slow):
                raise ProfileError(
                    f"{source}: 'slow_bits' must list bit-widths from {list(SUPPORTED_BITS)}"
                )
            object.__setattr__(profile, "slow_bits", tuple(sorted(set(slow))))
        key = data.get("trusted_key")
        if key is not None:
            if not isinstance(key, str) or not key.strip() or "\x00" in key:
                raise ProfileError(f"{source}: 'trusted_key' must be the path of a public key")
            path = Path(key).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            object.__setattr__(profile, "trusted_key", str(path))
        if not 0 < profile.usable_ram_bytes <= profile.ram_bytes:
            raise ProfileError(f"{source}: usable_ram_bytes must be in (0, ram_bytes]")
        if profile.cores <= 0 or profile.threads <= 0:
            raise ProfileError(f"{source}: cores and threads must be positive")
        if profile.threads > 2 * profile.cores:  # two hardware threads per core at most
            raise ProfileError(
                f"{source}: {profile.threads} threads on {profile.cores} cores is not a board"
            )
        bw = profile.memory_bandwidth_gbs
        if not (math.isfinite(bw) and bw > 0):
            raise ProfileError(f"{source}: memory_bandwidth_gbs must be positive")
        return profile


def list_profiles() -> list[str]:
    """Names of the shipped profiles, sorted."""
    root = resources.files(_PACKAGE)
    return sorted(
        entry.name[: -len(".json")] for entry in root.iterdir() if entry.name.endswith(".json")
    )


def load_profile(name: str) -> DeviceProfile:
    """A shipped profile by name (``"rpi4-4gb"``), or a path to a profile JSON file."""
    if name.endswith(".json") and Path(name).is_file():
        path = Path(name)
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise ProfileError(f"{path} is not UTF-8 text (byte {exc.start})") from None
        except OSError as exc:
            raise ProfileError(f"cannot read {path}: {exc.strerror or exc}") from None
        return _parse(text, str(path), expect_name=None, base_dir=path.resolve().parent)
    known = list_profiles()
    if name not in known:
        raise ProfileError(f"unknown device profile {name!r}; known profiles: {', '.join(known)}")
    text = resources.files(_PACKAGE).joinpath(f"{name}.json").read_text(encoding="utf-8")
    return _parse(text, f"profile {name!r}", expect_name=name)


def _parse(
    text: str, source: str, expect_name: str | None, base_dir: Path | None = None
) -> DeviceProfile:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ProfileError(f"{source} is not valid JSON: {exc}") from None
    profile = DeviceProfile.from_dict(data, source, base_dir)
    if expect_name is not None and profile.name != expect_name:
        raise ProfileError(f"{source}: file names itself {profile.name!r}")
    return profile
