"""Memory budgets as the user writes them: ``--budget 3.5bits``, ``600MB``, ``2GiB``, ``auto``.

Three kinds (see the design's "Quantization configuration"):

- ``bits``   average bits per weight over the quantized matrices, in (0, 32]
- ``bytes``  the whole process (weights, LoRA, KV cache, runtime); MB/GB are decimal
             (10^6, 10^9), MiB/GiB binary (2^20, 2^30), a bare ``B`` is bytes
- ``auto``   whatever the device has free (``probe.available_memory``)

Units are case-insensitive except that a bare lowercase ``b`` is refused: ``4b`` could be four
bits or four bytes, so bits are spelled ``bit``/``bits``.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

BudgetKind = Literal["bits", "bytes", "auto"]

MAX_BITS = 32.0
# Beyond this a byte budget is a typo, not a machine.
MAX_BYTES = 2**62

_BYTE_UNITS: dict[str, int] = {
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
# Canonical spelling of each unit, for messages.
_UNIT_NAMES: dict[str, str] = {
    "b": "B",
    "kb": "KB",
    "mb": "MB",
    "gb": "GB",
    "tb": "TB",
    "kib": "KiB",
    "mib": "MiB",
    "gib": "GiB",
    "tib": "TiB",
}
_UNIT_RE = re.compile(r"(bits?|[kmgt]i?b|b)\s*$", re.IGNORECASE)
_EXAMPLES = "e.g. '3.5bits', '600MB', '2GiB' or 'auto'"
# ASCII decimal only: float() would also take "3_0" (as 30) and non-ASCII digits.
_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?", re.ASCII)


class BudgetError(ValueError):
    """A budget that cannot be read, or that no configuration meets (the exporter's bit
    allocation raises it too); the message says what is wrong and what is expected."""


@dataclass(frozen=True)
class Budget:
    """A parsed budget. ``value`` is bits per weight (float), bytes (int), or None for auto.

    ``unit`` only remembers how the user wrote a byte budget ("MB", "GiB", ...), so messages can
    answer in the same unit; it takes no part in equality.
    """

    kind: BudgetKind
    value: float | int | None = None
    unit: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if self.kind == "auto":
            if self.value is not None:
                raise BudgetError("an 'auto' budget takes no value")
        elif self.kind == "bits":
            v = self.value
            if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
                raise BudgetError(f"bits budget must be a finite number, got {v!r}")
            if not 0.0 < v <= MAX_BITS:
                raise BudgetError(
                    f"bits budget must be in (0, {MAX_BITS:g}] bits per weight, got {v:g}"
                )
            object.__setattr__(self, "value", float(v))
            object.__setattr__(self, "unit", "bits")
        elif self.kind == "bytes":
            v = self.value
            if not isinstance(v, int) or isinstance(v, bool):
                raise BudgetError(f"bytes budget must be a whole number of bytes, got {v!r}")
            if v <= 0:
                raise BudgetError(f"bytes budget must be positive, got {v}")
            if v > MAX_BYTES:
                raise BudgetError(f"bytes budget {v} is implausibly large")
            # Unknown or missing display units fall back to MB.
            object.__setattr__(self, "unit", _UNIT_NAMES.get(str(self.unit).lower(), "MB"))
        else:
            raise BudgetError(f"unknown budget kind {self.kind!r}: expected bits, bytes or auto")

    @classmethod
    def bits(cls, value: float) -> Budget:
        return cls("bits", value)

    @classmethod
    def nbytes(cls, value: int, unit: str = "MB") -> Budget:
        return cls("bytes", value, unit)

    @classmethod
    def auto(cls) -> Budget:
        return cls("auto")

    def __str__(self) -> str:
        if self.kind == "auto":
            return "auto"
        if self.kind == "bits":
            return f"{self.value:g} bits"
        assert isinstance(self.value, int)
        return format_bytes(self.value, self.unit)


def unit_size(unit: str) -> int:
    """Bytes in one ``unit`` ("MB", "GiB", ...)."""
    try:
        return _BYTE_UNITS[unit.lower()]
    except KeyError:
        raise BudgetError(f"unknown byte unit {unit!r}") from None


def format_bytes(nbytes: int | float, unit: str = "MB", *, round_up: bool = False) -> str:
    """``412.3 MB``, ``2 GiB``, ``0.166 GB``: about four significant digits in ``unit``.

    ``round_up`` never understates, so a figure quoted as "needs ..." is enough when typed back.
    """
    size = unit_size(unit)
    name = _UNIT_NAMES[unit.lower()]
    if size == 1:
        return f"{math.ceil(nbytes) if round_up else int(nbytes)} B"
    x = nbytes / size
    decimals = 1 if x >= 100 else 2 if x >= 10 else 3
    if round_up:
        scale = 10**decimals
        # The small slack keeps exact figures (e.g. 412.3) from rounding up one more step.
        x = math.ceil(x * scale - 1e-9) / scale
    text = f"{x:.{decimals}f}".rstrip("0").rstrip(".")
    return f"{text} {name}"


def parse_budget(text: str) -> Budget:
    """Read a budget; raises ``BudgetError`` (a ``ValueError``) with one clear message."""
    if not isinstance(text, str):
        raise BudgetError(f"budget must be text, got {type(text).__name__}")
    s = text.strip()
    if not s:
        raise BudgetError(f"empty budget: expected {_EXAMPLES}")
    if s.lower() == "auto":
        return Budget.auto()

    m = _UNIT_RE.search(s)
    if m is None:
        raise BudgetError(f"budget {text!r} has no unit: expected {_EXAMPLES}")
    unit = m.group(1)
    number = s[: m.start()].strip()
    if not number:
        raise BudgetError(f"budget {text!r} has no number: expected {_EXAMPLES}")
    if unit == "b":
        raise BudgetError(f"budget {text!r} is ambiguous: write 'bits' or 'B' (bytes)")
    if not _NUMBER_RE.fullmatch(number):
        if number.strip("+-").lower() in ("nan", "inf", "infinity"):
            raise BudgetError(f"budget {text!r} is not a finite number")
        raise BudgetError(
            f"budget {text!r}: {number!r} is not a number (ASCII digits and one '.' only)"
        )
    value = float(number)
    if not math.isfinite(value):
        raise BudgetError(f"budget {text!r} is not a finite number")
    if value <= 0:
        raise BudgetError(f"budget {text!r} must be positive")

    if unit.lower().startswith("bit"):
        if value > MAX_BITS:
            raise BudgetError(
                f"budget {text!r}: at most {MAX_BITS:g} bits per weight (fp32) makes sense"
            )
        return Budget.bits(value)

    nbytes = value * _BYTE_UNITS[unit.lower()]
    if nbytes > MAX_BYTES:
        raise BudgetError(f"budget {text!r} is implausibly large")
    rounded = round(nbytes)
    if rounded <= 0:
        raise BudgetError(f"budget {text!r} is less than one byte")
    return Budget.nbytes(rounded, _UNIT_NAMES[unit.lower()])
