"""Spinning threads: on an idle machine, off when other processes keep the cores busy."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from coalora.runtime import contention
from coalora.runtime.contention import choose_spin
from coalora.runtime.engine import Runtime, RuntimeInputError


def test_given_modes_are_kept() -> None:
    assert choose_spin("on").spin and not choose_spin("off").spin
    assert choose_spin("on").session_config() == {contention.SPIN_CONFIG_KEY: "1"}
    assert choose_spin("off").session_config() == {contention.SPIN_CONFIG_KEY: "0"}
    with pytest.raises(ValueError, match="spin must be one of"):
        choose_spin("sometimes")


@pytest.mark.parametrize(("busy", "spin"), [(0.0, True), (0.4, True), (0.5, False), (3.0, False)])
def test_auto_turns_spinning_off_when_cores_are_busy_elsewhere(
    busy: float, spin: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(contention, "busy_cores_elsewhere", lambda *a, **k: busy)
    choice = choose_spin("auto")
    assert choice.spin == spin and f"{busy:.1f}" in choice.reason


def test_a_busy_process_is_seen_and_this_one_is_not() -> None:
    """A real busy loop in another process counts; this process's own work does not."""
    quiet = contention.busy_cores_elsewhere(0.2)
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.3)
        seen = contention.busy_cores_elsewhere(0.2)
    finally:
        hog.kill()
        hog.wait()
    assert seen >= min(quiet + 0.5, 0.8), (quiet, seen)


def test_the_engine_builds_with_the_choice(tiny_llama_bundle: Path) -> None:
    rt = Runtime.open(tiny_llama_bundle, budget="8bits", threads=1, spin="off")
    assert rt.spin is not None and rt.spin.spin is False
    rt.close()
    with pytest.raises(RuntimeInputError, match="spin must be one of"):
        Runtime.open(tiny_llama_bundle, budget="8bits", build=False, spin="yes")
