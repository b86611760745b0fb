"""Damaged and hostile bundles: every one is refused with one line, by open and by
``inspect --verify`` alike, never a traceback and never served. The catalogue is
``tests/damage.py`` (``benchmarks/robustness.py`` runs it too, as subprocesses)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from damage import ALL

from coalora.runtime.engine import Runtime
from coalora.runtime.format.reader import Bundle, BundleError


@pytest.fixture
def damaged(tiny_llama_bundle: Path, tmp_path: Path, request) -> Path:
    root = Path(shutil.copytree(tiny_llama_bundle, tmp_path / "bundle"))
    ALL[request.param](root)
    return root


def _open_and_serve(root: Path) -> None:
    from coalora.runtime.engine import Runtime

    rt = Runtime.open(root, budget="32bits", threads=1, context_length=128)
    rt.generate("hi", max_new_tokens=2)
    for entry in rt.pareto.entries:  # every stored configuration, so every file is read
        rt.switch(budget=f"{entry.bits + 1e-9:.12f}bits")
        rt.generate("hi", max_new_tokens=2)


@pytest.mark.parametrize("damaged", list(ALL), indirect=True)
def test_damaged_bundles_are_refused_by_open_and_verify(damaged: Path) -> None:
    from coalora.runtime.verify import verify_bundle

    with pytest.raises(BundleError) as info:
        verify_bundle(damaged)
    assert "\n" not in str(info.value)
    with pytest.raises(BundleError):
        _open_and_serve(damaged)


@pytest.mark.parametrize("damaged", ["rank-text", "deep-manifest", "garbage"], indirect=True)
def test_the_clis_give_one_line(damaged: Path) -> None:
    for argv in (
        ["coalora.runtime.cli", str(damaged), "--budget", "8bits", "--prompt", "hi"],
        ["coalora.export.cli", "inspect", str(damaged), "--verify"],
    ):
        module, *rest = argv
        code = f"from {module} import main as m; m()"
        proc = subprocess.run(
            [sys.executable, "-c", code, *rest], capture_output=True, text=True, timeout=300
        )
        lines = [line for line in proc.stderr.splitlines() if line.strip()]
        assert proc.returncode == 2, proc.stderr
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr


def test_a_dry_run_verifies_the_files_it_plans_for(tiny_llama_bundle: Path, tmp_path) -> None:
    from coalora.runtime.engine import Runtime

    root = Path(shutil.copytree(tiny_llama_bundle, tmp_path / "bundle"))
    rt = Runtime.open(root, budget="32bits", build=False)
    used = next(iter(rt.config.values()))
    path = root / "quant" / f"{used.name}.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="SHA-256"):
        Runtime.open(root, budget="32bits", build=False)
    others = [e for e in rt.pareto.entries if used not in e.config.values()]
    assert others  # the tiny bundle stores uniform configurations of each option
    Runtime.open(root, budget=f"{others[0].bits + 1e-9:.12f}bits", build=False)


def test_a_file_changed_while_served_stops_the_next_switch(
    tiny_llama_bundle: Path, tmp_path
) -> None:
    from coalora.runtime.engine import Runtime

    root = Path(shutil.copytree(tiny_llama_bundle, tmp_path / "bundle"))
    rt = Runtime.open(root, budget="32bits", threads=1, context_length=128)
    assert rt.bundle.changed_files() == []
    path = root / "quant" / "2b64.safetensors"
    path.write_bytes(path.read_bytes())  # same bytes, new mtime: cannot be trusted as verified
    assert rt.bundle.changed_files() == ["quant/2b64.safetensors"]
    with pytest.raises(BundleError, match="changed on disk"):
        rt.switch(budget="3.4bits")


def test_an_intact_bundle_still_verifies(tiny_llama_bundle: Path) -> None:
    from coalora.runtime.verify import verify_bundle

    assert isinstance(verify_bundle(tiny_llama_bundle), Bundle)


@pytest.mark.parametrize("damaged", ["garbage", "nan-output"], indirect=True)
def test_slimming_refuses_a_damaged_theta(damaged: Path, tmp_path: Path) -> None:
    from coalora.export.slim import slim_bundle

    with pytest.raises(BundleError, match="theta.onnx"):
        slim_bundle(damaged, tmp_path / "slim", max_bits=32)
    assert not (tmp_path / "slim").exists()


def test_embedding_rows_of_a_base_file_cut_after_open_are_refused(
    tiny_llama_bundle: Path, tmp_path: Path
) -> None:
    """The embedding rows are read from the base file per run (``runtime.table_rows``): a
    file cut short while serving is one BundleError naming it, not a signal or a traceback."""
    from coalora.runtime import assemble

    root = Path(shutil.copytree(tiny_llama_bundle, tmp_path / "bundle"))
    rt = Runtime.open(root, budget="32bits", threads=1, context_length=128, build=False)
    rows = assemble.head_table_rows(rt._mapped, rt.arch, rt.accuracy_level)
    assert rows is not None
    last = np.array([[rt.arch.vocab_size - 1]])
    rows.feeds(last)
    base = root / "base.safetensors"
    with base.open("r+b") as fh:
        fh.truncate(8)  # the header's length field and nothing after it
    with pytest.raises(BundleError, match="base.safetensors: row"):
        rows.feeds(last)
    rows.close()


def test_an_architecture_the_matrices_do_not_fit_is_refused_at_open(
    tiny_llama_bundle: Path, tmp_path: Path
) -> None:
    """Heads that disagree with the stored k/v matrices (here num_key_value_heads dropped, so
    it defaults to the query heads): one BundleError when the graph is built, not an
    onnxruntime failure on the first run (the fed embedding rows leave shape inference
    blind to it)."""
    import json

    from coalora.runtime.format.spec import MANIFEST, Arch, Key

    root = Path(shutil.copytree(tiny_llama_bundle, tmp_path / "bundle"))
    manifest = json.loads((root / MANIFEST).read_text())
    cfg = manifest[Key.ARCHITECTURE][Arch.CONFIG]
    assert cfg["num_key_value_heads"] != cfg["num_attention_heads"]
    del cfg["num_key_value_heads"]
    (root / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="k_proj is .* the architecture says"):
        Runtime.open(root, budget="32bits", threads=1, context_length=128)
