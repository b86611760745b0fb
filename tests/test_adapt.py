"""--adapt: the memory watcher switches down under pressure, back up after the hold time, and
never oscillates; driven by a fake probe and a fake clock over a real tiny runtime."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from coalora.runtime.adapt import AdaptPolicy, MemoryAdapter, MemorySample
from coalora.runtime.budget import Budget, parse_budget
from coalora.runtime.engine import Runtime
from coalora.runtime.pressure import read_pressure

POLICY = AdaptPolicy(margin_down=0.10, margin_up=0.25, hold_s=5.0, psi_threshold=20.0)


class Fake:
    """A probe and a clock the test moves by hand."""

    def __init__(self, available: int) -> None:
        self.sample = MemorySample(available)
        self.now = 0.0

    def set(self, available: int, psi: float | None = None, events=None) -> None:
        self.sample = MemorySample(available, psi, events)


def weights_only(rt: Runtime) -> Runtime:
    """Plans without the runtime's fixed 64 MiB: a tiny model's configurations then differ by
    10-30% of their plans, as a real model's do, instead of by 0.1%."""
    rt.accountant = dataclasses.replace(rt.accountant, overhead_bytes=0)
    rt.use(rt.choose(Budget.auto()))
    return rt


@pytest.fixture
def rt(tiny_llama_bundle: Path):
    rt = Runtime.open(tiny_llama_bundle, budget="auto", threads=1, context_length=64)
    yield weights_only(rt)
    rt.close()


def _plans(rt: Runtime) -> tuple[int, int]:
    """(the plan served now, the smallest stored plan)."""
    plans = sorted({rt.plan(e.config).total for e in rt.pareto.entries})
    return rt.selection.plan.total, plans[0]


def _adapter(rt: Runtime, fake: Fake, policy: AdaptPolicy = POLICY) -> MemoryAdapter:
    return MemoryAdapter(
        rt, Budget.auto(), policy, sample=lambda: fake.sample, clock=lambda: fake.now
    )


def test_down_under_pressure_then_up_after_the_hold(rt: Runtime) -> None:
    top, _ = _plans(rt)
    top_bits = rt.selection.entry.bits
    fake = Fake(available=10 * top)
    a = _adapter(rt, fake)
    assert a.check() is None and rt.selection.plan.total == top

    # Less than 10% of the plan free: switch down to what fits with 10% to spare.
    room_left = int(0.05 * top)
    fake.set(room_left)
    fake.now = 1.0
    event = a.check()
    assert event is not None and event.direction == "down"
    # A smaller plan, not necessarily fewer bits: a configuration whose q/k/v options differ
    # builds no fused copies.
    assert event.from_bits == top_bits and event.to_plan_bytes < event.from_plan_bytes
    new = rt.selection.plan.total
    assert new * 1.10 <= room_left + top
    assert rt.generate("the news", max_new_tokens=3) is not None  # the new session serves
    assert "below 10%" in event.reason

    # The memory comes back (the switch freed top - new, and the pressure went away).
    fake.set(10 * top)
    for t in (2.0, 4.0, 5.9):  # not before the hold time has passed
        fake.now = t
        assert a.check() is None
    fake.now = 7.5
    event = a.check()
    assert event is not None and event.direction == "up" and event.to_bits == top_bits
    assert [e.direction for e in a.events] == ["down", "up"]


def test_hysteresis_never_oscillates(rt: Runtime) -> None:
    top, _ = _plans(rt)
    fake = Fake(int(0.05 * top))
    a = _adapter(rt, fake)
    fake.now = 1.0
    down = a.check()
    assert down is not None
    new = rt.selection.plan.total
    # What the device has, unchanged, now that the smaller session freed its share.
    fake.set(int(0.05 * top) + (top - new))
    for i in range(100):
        fake.now = 2.0 + i
        assert a.check() is None, a.events[-1].reason
    assert len(a.events) == 1


def test_an_up_switch_needs_the_wider_margin(rt: Runtime) -> None:
    top, _ = _plans(rt)
    fake = Fake(int(0.05 * top))
    a = _adapter(rt, fake)
    fake.now = 1.0
    assert a.check() is not None
    new = rt.selection.plan.total
    # Room for the top plan with 20% to spare: enough to stay up, not enough to go up.
    fake.set(int(1.20 * top) - new)
    for i in range(20):
        fake.now = 2.0 + i
        assert a.check() is None
    fake.set(int(1.26 * top) - new)
    fake.now = 30.0
    a.check()  # the hold starts here
    fake.now = 36.0
    up = a.check()
    assert up is not None and up.direction == "up"


def test_psi_and_cgroup_events_send_it_down(rt: Runtime) -> None:
    top, _ = _plans(rt)
    fake = Fake(10 * top)
    a = _adapter(rt, fake)
    fake.set(10 * top, psi=35.0)
    fake.now = 1.0
    event = a.check()
    assert event is not None and event.direction == "down" and "PSI" in event.reason
    assert rt.selection.plan.total < top

    b = _adapter(rt, fake)
    rt.use(rt.choose(Budget.auto()))
    fake.set(10 * top, events={"high": 0, "max": 3})
    fake.now = 2.0
    assert b.check() is None  # the first reading is the baseline
    fake.set(10 * top, events={"high": 0, "max": 4})
    fake.now = 3.0
    event = b.check()
    assert event is not None and "memory.events max" in event.reason


def test_nothing_smaller_fits_stays_put(rt: Runtime) -> None:
    _, smallest = _plans(rt)
    # a byte budget of the smallest plan: the fewest bits need not be it (prepacked 2-bit
    # weights hold more per stored byte than 4-bit ones, ``plan.PREPACKED_FACTOR``)
    rt.use(rt.choose(parse_budget(f"{smallest}B")))
    assert rt.selection.plan.total == smallest
    fake = Fake(1)
    a = _adapter(rt, fake)
    for t in (1.0, 2.0):
        fake.now = t
        assert a.check() is None and rt.selection.plan.total == smallest


def test_the_users_budget_is_a_ceiling(rt: Runtime) -> None:
    low = min(e.bits for e in rt.pareto.entries)
    rt.switch(Budget.bits(low + 1e-6))
    fake = Fake(100 * rt.selection.plan.total)
    a = MemoryAdapter(
        rt, Budget.bits(low + 1e-6), POLICY, sample=lambda: fake.sample, clock=lambda: fake.now
    )
    for t in (1.0, 10.0, 20.0):
        fake.now = t
        assert a.check() is None
    assert rt.selection.entry.bits == low


def test_open_with_adapt_watches_and_checks_before_requests(tiny_llama_bundle: Path) -> None:
    rt = Runtime.open(
        tiny_llama_bundle,
        threads=1,
        context_length=64,
        adapt=AdaptPolicy(interval_s=0.05, hold_s=1.0),
    )
    try:
        assert rt.adapt is not None and rt.adapt._thread is not None
        weights_only(rt)
        top = rt.selection.plan.total
        rt.adapt._sample_fn = lambda: MemorySample(int(0.01 * top))
        rt.generate("the news", max_new_tokens=2)  # the check runs first
        assert rt.adapt.events and rt.adapt.events[-1].direction == "down"
        assert rt.selection.plan.total < top
    finally:
        rt.close()
    assert rt.adapt._thread is None


def test_pressure_files(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "self").mkdir(parents=True)
    (proc / "pressure").mkdir()
    (proc / "self" / "cgroup").write_text("0::/app\n")
    (proc / "pressure" / "memory").write_text(
        "some avg10=1.50 avg60=0.20 avg300=0.00 total=1\nfull avg10=0.00 avg60=0 avg300=0 total=0\n"
    )
    cg = tmp_path / "cg"
    (cg / "app").mkdir(parents=True)
    (cg / "app" / "memory.events").write_text("low 0\nhigh 2\nmax 5\noom 0\noom_kill 0\n")
    p = read_pressure(cgroup_root=cg, proc_root=proc)
    assert p.psi_some_avg10 == 1.5  # no cgroup memory.pressure: the system's
    assert p.events == {"high": 2, "max": 5, "oom": 0, "oom_kill": 0}
    (cg / "app" / "memory.pressure").write_text("some avg10=42.00 avg60=1 avg300=0 total=9\n")
    assert read_pressure(cgroup_root=cg, proc_root=proc).psi_some_avg10 == 42.0
    empty = read_pressure(cgroup_root=tmp_path / "none", proc_root=tmp_path / "none")
    assert empty.psi_some_avg10 is None and empty.events is None


def test_policy_checks_its_margins() -> None:
    with pytest.raises(ValueError):
        AdaptPolicy(margin_down=0.3, margin_up=0.2)
