"""Re-selecting the configuration when the device's memory changes (``--adapt``).

A watcher samples what this process may still allocate (``probe.available_memory``: psutil
clamped by the cgroup and rlimit, minus the reserve) and, where the kernel has them, PSI and
the cgroup's ``memory.events`` (``runtime.pressure``). With ``P`` the plan of the configuration
being served and ``A`` the available bytes, the process could hold ``A + P`` in all:

- down: when ``A < margin_down * P`` (or PSI ``some avg10`` reaches ``psi_threshold``, or a
  ``memory.events`` counter grew), switch at once to the best configuration within the
  user's budget whose plan leaves ``margin_down`` of itself free: ``plan * (1 + margin_down)
  <= A + P`` (and strictly smaller than ``P`` when only PSI or events fired);
- up: when a better configuration fits with the wider ``margin_up`` (``plan * (1 +
  margin_up) <= A + P``) on every sample for ``hold_s`` seconds, and ``hold_s`` has passed
  since the last switch, switch to it.

``margin_up > margin_down`` is the hysteresis: right after a switch up the headroom is at
least ``margin_up`` of the new plan, above the ``margin_down`` that would send it back down,
so the choice only moves when memory does. Switches happen in ``check()``, which the
runtime calls before each request (and the server between requests), never mid-stream; each
is logged with its reason.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from coalora.runtime.budget import Budget, format_bytes
from coalora.runtime.pressure import read_pressure
from coalora.runtime.probe import available_memory
from coalora.runtime.selection import Selection, SelectionError, select

if TYPE_CHECKING:
    from coalora.runtime.engine import Runtime

log = logging.getLogger("coalora.runtime.adapt")


@dataclass(frozen=True)
class AdaptPolicy:
    margin_down: float = 0.10
    margin_up: float = 0.25
    hold_s: float = 10.0
    interval_s: float = 1.0  # the watcher's sampling period
    psi_threshold: float | None = 25.0  # percent; None ignores PSI

    def __post_init__(self) -> None:
        if not 0 <= self.margin_down < self.margin_up:
            raise ValueError(
                f"adapt margins need 0 <= down < up, got {self.margin_down} and {self.margin_up}"
            )
        if self.hold_s < 0 or self.interval_s <= 0:
            raise ValueError("adapt hold must be >= 0 s and the interval > 0 s")


@dataclass(frozen=True)
class MemorySample:
    available_bytes: int
    psi_some_avg10: float | None = None
    events: dict[str, int] | None = None


def probe_sample() -> MemorySample:
    """The real probe: available bytes (cgroup-clamped, minus the reserve), PSI, events."""
    p = read_pressure()
    return MemorySample(available_memory().available_bytes, p.psi_some_avg10, p.events)


@dataclass(frozen=True)
class AdaptEvent:
    time: float  # the clock's reading (monotonic seconds by default)
    direction: str  # "down" or "up"
    from_bits: float
    to_bits: float
    from_plan_bytes: int
    to_plan_bytes: int
    available_bytes: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class MemoryAdapter:
    """Watches memory for one ``Runtime`` and switches its configuration between requests."""

    def __init__(
        self,
        runtime: Runtime,
        budget: Budget,
        policy: AdaptPolicy | None = None,
        *,
        sample: Callable[[], MemorySample] = probe_sample,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.runtime = runtime
        self.budget = budget  # the user's ceiling: adapting never goes above it
        self.policy = policy or AdaptPolicy()
        self._sample_fn = sample
        self._clock = clock
        self._lock = threading.Lock()
        self.last: MemorySample | None = None
        self._events_seen: dict[str, int] | None = None
        self._pressure: str | None = None  # why the last sample called for a switch down
        self._good_since: float | None = None  # since when a better configuration fits
        self._last_switch = clock()
        self._stuck: str | None = None  # the last "cannot go lower" message, logged once
        self.events: deque[AdaptEvent] = deque(maxlen=256)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- watching ------------------------------------------------------------------------------
    def start(self) -> None:
        """Sample every ``interval_s`` on a daemon thread, so the hold time is measured even
        while no request calls ``check``."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="coalora-adapt", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def _watch(self) -> None:
        while not self._stop.wait(self.policy.interval_s):
            try:
                self.observe()
            except Exception:  # a failed read must not kill the watcher
                log.exception("memory sample failed")

    def _current(self) -> Selection:
        return self.runtime.selection

    def _fit(self, cap: float) -> Selection | None:
        try:
            rt = self.runtime
            return select(
                rt.pareto,
                self.budget,
                rt.plan,
                available_bytes=int(cap),
                cpu=rt.cpu_class(rt.profile),  # the same options avoided as slow as at open
                accuracy_level=rt.accuracy_level,
            )
        except SelectionError:
            return None

    def observe(self) -> MemorySample:
        """Take one sample and update the pressure flag and the hold timer."""
        s = self._sample_fn()
        p = self.policy
        now = self._clock()
        with self._lock:
            cur = self._current()
            plan = cur.plan.total
            why: str | None = None
            if s.available_bytes < p.margin_down * plan:
                why = (
                    f"{format_bytes(s.available_bytes)} available, below {p.margin_down:.0%} "
                    f"of the {format_bytes(plan)} plan"
                )
            elif (
                p.psi_threshold is not None
                and s.psi_some_avg10 is not None
                and s.psi_some_avg10 >= p.psi_threshold
            ):
                why = f"memory pressure (PSI some avg10 {s.psi_some_avg10:.1f}%)"
            elif s.events is not None and self._events_seen is not None:
                grew = [k for k, v in s.events.items() if v > self._events_seen.get(k, 0)]
                if grew:
                    why = f"the cgroup hit its limit (memory.events {', '.join(sorted(grew))})"
            if s.events is not None:
                self._events_seen = dict(s.events)
            self._pressure = why
            if why is not None:
                self._good_since = None
            else:
                up = self._fit((s.available_bytes + plan) / (1 + p.margin_up))
                if up is not None and self.runtime.pareto.better(up.entry.metric, cur.entry.metric):
                    if self._good_since is None:
                        self._good_since = now
                else:
                    self._good_since = None
            self.last = s
        return s

    # -- switching -----------------------------------------------------------------------------
    def check(self) -> AdaptEvent | None:
        """Sample, and switch if the policy says so. Call only where no request is running."""
        s = self.observe()
        p = self.policy
        now = self._clock()
        with self._lock:
            cur = self._current()
            plan = cur.plan.total
            room = s.available_bytes + plan
            if self._pressure is not None:
                cap = room / (1 + p.margin_down)
                if s.available_bytes >= p.margin_down * plan:  # PSI or events only: go lower
                    cap = min(cap, plan - 1)
                target = self._fit(cap)
                if target is None or target.plan.total >= plan:
                    msg = f"{self._pressure}; no smaller stored configuration fits"
                    if msg != self._stuck:
                        log.warning("adapt: %s: staying at %.2f bits", msg, cur.entry.bits)
                        self._stuck = msg
                    return None
                return self._switch("down", cur, target, s, self._pressure, now)
            self._stuck = None
            held = self._good_since is not None and now - self._good_since >= p.hold_s
            if held and now - self._last_switch >= p.hold_s:
                target = self._fit(room / (1 + p.margin_up))
                if target is not None and self.runtime.pareto.better(
                    target.entry.metric, cur.entry.metric
                ):
                    held_s = now - self._good_since
                    why = (
                        f"{format_bytes(s.available_bytes)} available for {held_s:.0f} s: room "
                        f"for {format_bytes(target.plan.total)} with {p.margin_up:.0%} to spare"
                    )
                    return self._switch("up", cur, target, s, why, now)
        return None

    def _switch(
        self,
        direction: str,
        cur: Selection,
        target: Selection,
        s: MemorySample,
        why: str,
        now: float,
    ) -> AdaptEvent:
        self.runtime.use(target)
        event = AdaptEvent(
            time=now,
            direction=direction,
            from_bits=cur.entry.bits,
            to_bits=target.entry.bits,
            from_plan_bytes=cur.plan.total,
            to_plan_bytes=target.plan.total,
            available_bytes=s.available_bytes,
            reason=why,
        )
        self.events.append(event)
        self._last_switch = now
        self._good_since = None
        self._pressure = None
        log.info(
            "adapt: switched %s %.2f -> %.2f bits (plan %s -> %s): %s",
            direction,
            event.from_bits,
            event.to_bits,
            format_bytes(event.from_plan_bytes),
            format_bytes(event.to_plan_bytes),
            why,
        )
        return event
