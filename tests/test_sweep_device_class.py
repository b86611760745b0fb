"""The exporter's second front: allocations within the options a CPU class runs fast."""

from __future__ import annotations

import numpy as np
import pytest

from coalora.export.pipeline import ExportError, ExportOptions
from coalora.export.sweep import SweepPoint, deployable, fast_space, fast_sweep_configurations
from coalora.kernels import ConfigSpace, MatrixSpec
from coalora.runtime.format.pareto import ParetoEntry

SPACE = ConfigSpace([MatrixSpec("a", 64, 128), MatrixSpec("b", 128, 128), MatrixSpec("c", 96, 64)])


def _costs() -> np.ndarray:
    # Error falls with bits; a different slope per matrix so allocations differ by budget.
    bits = np.array([o.bits for o in SPACE.options], dtype=np.float64)
    return np.stack([s * 2.0 ** (-bits) for s in (1.0, 3.0, 0.5)])


def test_fast_space_and_allocations() -> None:
    sub = fast_space(SPACE, "armv8.0")
    assert sub is not None and {o.bits for o in sub.options} == {4}
    assert fast_space(SPACE, "x86-64") is None  # nothing slow: no second front
    got = fast_sweep_configurations(SPACE, _costs(), "armv8.0", lo=2.5, hi=8.0, step=0.25)
    assert got, "the 4-bit range must give at least one allocation"
    for config, source in got:
        assert {o.bits for o in config.values()} == {4} and source.startswith("armv8.0-")
        assert SPACE.validate({k: str(v) for k, v in config.items()}) == config


def _point(options: dict[str, str], metric: float) -> SweepPoint:
    c = SPACE.validate(options)
    return SweepPoint(ParetoEntry(c, SPACE.bits(c), SPACE.nbytes(c), metric, True), "test")


def test_deployable_keeps_the_fast_front() -> None:
    points = [
        _point({"a": "2b64", "b": "2b64", "c": "2b64"}, 90.0),  # perplexity: lower is better
        _point({"a": "4b64", "b": "2b64", "c": "8b32"}, 40.0),
        _point({"a": "4b64", "b": "4b64", "c": "4b64"}, 45.0),  # dominated by the one above
        _point({"a": "8b32", "b": "8b32", "c": "8b32"}, 30.0),
    ]
    uniform4 = points[2].entry.config
    full = deployable(points, "causal-lm", None)
    assert len(full) == 3 and uniform4 not in {e.config for e in full.entries}
    both = deployable(points, "causal-lm", "armv8.0")
    assert len(both) == 4 and uniform4 in {e.config for e in both.entries}
    assert [e.bits for e in both.entries] == sorted(e.bits for e in both.entries)


def test_export_options_check_the_class() -> None:
    opts = ExportOptions.for_model("minilm", "out", device_class="armv8.0")
    opts.check()
    assert "device_class" not in opts.training_key()  # the sweep only: training is reused
    with pytest.raises(ExportError, match="unknown device class"):
        ExportOptions.for_model("minilm", "out", device_class="armv9").check()
