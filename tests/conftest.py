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
