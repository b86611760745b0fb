"""Device profiles ship as package data and load by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from coalora.runtime.profiles import DeviceProfile, ProfileError, list_profiles, load_profile

BOARDS = ["ci-2core", "jetson-nano-4gb", "rpi4-2gb", "rpi4-4gb", "rpi5-8gb"]


def test_all_boards_are_listed() -> None:
    assert set(BOARDS) <= set(list_profiles())
    assert list_profiles() == sorted(list_profiles())


@pytest.mark.parametrize("name", BOARDS)
def test_profiles_load_and_are_plausible(name: str) -> None:
    p = load_profile(name)
    assert isinstance(p, DeviceProfile)
    assert p.name == name
    assert 0 < p.usable_ram_bytes < p.ram_bytes
    assert p.cores >= 1 and p.threads >= 1
    assert p.memory_bandwidth_gbs > 0
    assert "approximate" in p.notes
    assert p.budget().kind == "bytes" and p.budget().value == p.usable_ram_bytes


def test_board_facts() -> None:
    assert load_profile("rpi5-8gb").has_dotprod
    assert not load_profile("rpi4-4gb").has_dotprod
    assert load_profile("rpi4-2gb").cpu == "cortex-a72"
    ci = load_profile("ci-2core")
    assert ci.cores == 2 and ci.isa.startswith("x86-64")


def test_unknown_profile_lists_the_known_ones() -> None:
    with pytest.raises(ProfileError, match="unknown device profile 'rpi9'") as info:
        load_profile("rpi9")
    for name in BOARDS:
        assert name in str(info.value)
    assert isinstance(info.value, ValueError)


def test_profile_from_a_file(tmp_path: Path) -> None:
    data = json.loads(json.dumps(load_profile("rpi4-2gb").__dict__, default=list))
    data["name"] = "my-board"
    path = tmp_path / "my-board.json"
    path.write_text(json.dumps(data))
    assert load_profile(str(path)).name == "my-board"

    data["usable_ram_bytes"] = data["ram_bytes"] + 1
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="usable_ram_bytes"):
        load_profile(str(path))
    del data["cores"]
    path.write_text(json.dumps(data))
    with pytest.raises(ProfileError, match="missing field 'cores'"):
        load_profile(str(path))
    path.write_text("{not json")
    with pytest.raises(ProfileError, match="not valid JSON"):
        load_profile(str(path))
