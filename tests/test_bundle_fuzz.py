"""Property: whatever one mutation does to manifest.json, pareto.json or a safetensors header
of a tiny bundle (rehashed, so only the checks beyond hashes stand in the way), opening and
serving it either works or fails with one of the runtime's one-line errors."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coalora.runtime.format.spec import MANIFEST, PARETO_FILE, Key

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every place in a JSON value, as key/index paths."""
    out = [prefix]
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value[:4]):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(doc: Any, path: tuple, new: Any, delete: bool) -> Any:
    if not path:
        return new
    parent = doc
    for k in path[:-1]:
        parent = parent[k]
    if delete and isinstance(parent, dict):
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return doc


def _rehash(root: Path, rel: str) -> None:
    import hashlib

    from coalora.runtime.format.spec import FileEntry

    manifest = json.loads((root / MANIFEST).read_text())
    files = manifest.get(Key.FILES)
    if isinstance(files, dict) and isinstance(files.get(rel), dict):
        data = (root / rel).read_bytes()
        files[rel] = {
            FileEntry.SHA256: hashlib.sha256(data).hexdigest(),
            FileEntry.BYTES: len(data),
        }
        (root / MANIFEST).write_text(json.dumps(manifest))


def _serve(root: Path) -> None:
    from coalora.runtime.engine import Runtime

    rt = Runtime.open(root, budget="32bits", threads=1, context_length=128)
    rt.generate("hi", max_new_tokens=2)


def _one_line_errors() -> tuple[type[BaseException], ...]:
    from coalora.runtime.budget import BudgetError
    from coalora.runtime.engine import ModelOutputError, RuntimeInputError
    from coalora.runtime.format.reader import BundleError
    from coalora.runtime.selection import SelectionError

    return (BundleError, SelectionError, BudgetError, RuntimeInputError, ModelOutputError)


@pytest.fixture(scope="module")
def pristine(tiny_llama_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = Path(shutil.copytree(tiny_llama_bundle, tmp_path_factory.mktemp("fuzz") / "pristine"))
    _serve(root)  # unmutated, it serves: every refusal below is the mutation's
    return root


FILES = st.sampled_from([MANIFEST, PARETO_FILE, "quant/4b32.safetensors", "lora.safetensors"])


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(rel=FILES, pick=st.integers(min_value=0), new=JSON_VALUES, delete=st.booleans())
def test_any_mutation_is_served_or_one_error_line(
    pristine: Path, tmp_path_factory: pytest.TempPathFactory, rel: str, pick: int, new, delete
) -> None:
    root = Path(shutil.copytree(pristine, tmp_path_factory.mktemp("case") / "b"))
    path = root / rel
    if rel.endswith(".safetensors"):
        raw = path.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        doc = json.loads(raw[8 : 8 + n])
        places = _paths(doc)
        doc = _mutate(doc, places[pick % len(places)], new, delete)
        text = json.dumps(doc).encode()
        path.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
        _rehash(root, rel)
    else:
        doc = json.loads(path.read_text())
        places = _paths(doc)
        doc = _mutate(doc, places[pick % len(places)], new, delete)
        path.write_text(json.dumps(doc))
        if rel != MANIFEST:
            _rehash(root, rel)
    try:
        _serve(root)
    except _one_line_errors() as exc:
        assert "\n" not in str(exc).strip(), str(exc)
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)
