"""Shared fixtures: tiny bundles, exported once per test session."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session", autouse=True)
def _device_speed_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One cache of measured decode costs (``runtime/speed.py``) for the whole run, shared
    with the CLI subprocesses the tests start: measured once, not once per dry run, and
    never in the user's home."""
    path = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_CACHE_HOME", str(path))
        yield path


@pytest.fixture(scope="session")
def tiny_llama_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bundles import build_llama_bundle

    return build_llama_bundle(tmp_path_factory.mktemp("bundles") / "tiny-llama")


@pytest.fixture(scope="session")
def tiny_bert_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bundles import build_bert_bundle

    return build_bert_bundle(tmp_path_factory.mktemp("bundles") / "tiny-bert")


@pytest.fixture
def one_torch_thread():
    """torch on one thread for the test (tiny tensors: extra threads only add contention on a
    shared 2-core machine). Not autouse: the runtime's tests never import torch."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
