"""Whether the session's threads may spin: off when other work holds the cores.

onnxruntime's intra-op threads spin between the few hundred nodes of a decode step, which
saves a wake-up per node on an idle machine. When another process runs on the same cores the
spinning threads take the CPU from the thread the step waits for. ``benchmarks/contention.py``
measured it on the 2-core x86-64 machine with the demo bundle at 4.5 bits: quiet, 77.4 tok/s
spinning against 61.8 without; beside one busy core, 40.8 against 57.6. So ``auto`` looks at
the CPUs once, when a session is built: if the rest of the machine keeps at least
``BUSY_ELSEWHERE_CORES`` busy, spinning is off.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Literal

import psutil

SpinMode = Literal["auto", "on", "off"]
SPIN_MODES: tuple[str, ...] = ("auto", "on", "off")
# Half a core busy with other work is enough for spinning to cost more than it saves.
BUSY_ELSEWHERE_CORES = 0.5
SAMPLE_S = 0.05
SPIN_CONFIG_KEY = "session.intra_op.allow_spinning"


@dataclass(frozen=True)
class SpinChoice:
    spin: bool
    reason: str  # one line, for the user

    def session_config(self) -> dict[str, str]:
        return {SPIN_CONFIG_KEY: "1" if self.spin else "0"}


def busy_cores_elsewhere(sample_s: float = SAMPLE_S) -> float:
    """Cores' worth of CPU time other processes used over ``sample_s`` (this one idle).

    The busy share is busy ticks over all ticks counted, not ``100 - idle``: some kernels
    (the x86-64 test VM among them) account only part of each interval, so the percentages
    need not sum to 100. Steal (time the host gave to other machines) is not counted.
    """
    me = psutil.Process()
    mine0, t0 = sum(me.cpu_times()[:2]), psutil.cpu_times()
    time.sleep(sample_s)
    mine, t1 = sum(me.cpu_times()[:2]) - mine0, psutil.cpu_times()
    delta = {f: getattr(t1, f) - getattr(t0, f) for f in t0._fields}
    busy = sum(delta.get(f, 0.0) for f in ("user", "nice", "system", "irq", "softirq"))
    counted = busy + delta.get("idle", 0.0) + delta.get("iowait", 0.0)
    if counted <= 0:
        return 0.0
    cores = psutil.cpu_count() or 1
    return max(0.0, busy / counted * cores - mine / sample_s)


def choose_spin(mode: str) -> SpinChoice:
    """``on``/``off`` as given; ``auto``: off when the machine is busy elsewhere."""
    if mode not in SPIN_MODES:
        raise ValueError(f"spin must be one of {', '.join(SPIN_MODES)}, got {mode!r}")
    if mode != "auto":
        return SpinChoice(mode == "on", f"spinning {mode} (--spin {mode})")
    busy = busy_cores_elsewhere()
    if busy >= BUSY_ELSEWHERE_CORES:
        return SpinChoice(False, f"spinning off: {busy:.1f} cores busy with other work")
    return SpinChoice(True, f"spinning on: the cores are idle ({busy:.1f} busy elsewhere)")
