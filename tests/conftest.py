"""Shared fixtures: tiny bundles, exported once per test session."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))


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
