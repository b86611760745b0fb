"""Bundle writer -> reader round trip, and every kind of damage refused with one clear line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from coalora.kernels import ConfigSpace, Configuration, MatrixSpec, QuantOption, quantize
from coalora.kernels.matmulnbits import dequantize, to_matmulnbits
from coalora.runtime.format.reader import Bundle, BundleError
from coalora.runtime.format.writer import BundleContents, write_bundle

OPTS = (QuantOption(2, 32), QuantOption(4, 64), QuantOption(8, 128))


def _contents(seed: int = 0) -> tuple[BundleContents, dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    space = ConfigSpace([MatrixSpec("l0.q", 32, 96), MatrixSpec("l0.up", 64, 32)], OPTS)
    weights = {m.name: rng.standard_normal(m.shape).astype(np.float32) for m in space.matrices}
    quantized = {o: {n: to_matmulnbits(quantize(w, o)) for n, w in weights.items()} for o in OPTS}
    r = 4
    contents = BundleContents(
        architecture={"family": "llama", "task": "causal-lm", "config": {"hidden_size": 32}},
        space=space,
        quantized=quantized,
        base={"embed": rng.standard_normal((10, 32)).astype(np.float32)},
        lora_a={
            m.name: rng.standard_normal((r, m.in_features)).astype(np.float32)
            for m in space.matrices
        },
        lora_b={
            m.name: rng.standard_normal((m.out_features, r)).astype(np.float32)
            for m in space.matrices
        },
        lora_rank=r,
        lora_alpha=8.0,
        theta_onnx=b"not-a-real-graph",
        theta_vocab={"bits": [2, 4, 8]},
        pareto={"metric": "perplexity", "higher_is_better": False, "entries": []},
    )
    return contents, weights


@pytest.fixture
def bundle_dir(tmp_path: Path) -> Path:
    contents, _ = _contents()
    return write_bundle(tmp_path / "b", contents)


def test_round_trip(bundle_dir: Path) -> None:
    contents, _ = _contents()
    b = Bundle.open(bundle_dir, verify="all")
    assert b.lora_rank == 4 and b.lora_scale == pytest.approx(2.0)
    assert [o.name for o in b.space.options] == ["2b32", "4b64", "8b128"]
    cfg = Configuration({"l0.q": QuantOption(2, 32), "l0.up": QuantOption(8, 128)})
    got = b.quantized(cfg)
    for name, opt in cfg.items():
        want = contents.quantized[opt][name]
        np.testing.assert_array_equal(dequantize(got[name]), dequantize(want))
    lora = b.lora_tensors()
    np.testing.assert_array_equal(lora["l0.q.A"], contents.lora_a["l0.q"])
    np.testing.assert_array_equal(b.base_tensors()["embed"], contents.base["embed"])
    assert b.pareto_dict()["metric"] == "perplexity"
    assert b.size_on_disk() > 0


def test_only_shipped_pairs_are_served(tmp_path: Path) -> None:
    contents, _ = _contents()
    contents.quantized = {
        OPTS[0]: dict(contents.quantized[OPTS[0]]),
        OPTS[1]: {"l0.q": contents.quantized[OPTS[1]]["l0.q"]},
    }
    b = Bundle.open(write_bundle(tmp_path / "slim", contents))
    assert [o.name for o in b.space.options] == ["2b32", "4b64"]
    with pytest.raises(BundleError, match="does not ship option 4b64 for matrix 'l0.up'"):
        b.quantized(Configuration({"l0.q": OPTS[0], "l0.up": OPTS[1]}))


def _edit_manifest(root: Path, fn) -> None:
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    fn(data)
    path.write_text(json.dumps(data))


def test_truncated_file_is_refused(bundle_dir: Path) -> None:
    path = bundle_dir / "quant" / "4b64.safetensors"
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(BundleError, match=r"quant/4b64.safetensors is \d+ bytes.*truncated"):
        Bundle.open(bundle_dir)


def test_altered_file_is_refused_when_used(bundle_dir: Path) -> None:
    path = bundle_dir / "lora.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    b = Bundle.open(bundle_dir)  # sizes match: hashing happens on first use
    with pytest.raises(BundleError, match="lora.safetensors fails its SHA-256 check"):
        b.lora_tensors()
    with pytest.raises(BundleError, match="SHA-256"):
        Bundle.open(bundle_dir, verify="all")


def test_missing_file_is_refused(bundle_dir: Path) -> None:
    (bundle_dir / "theta.onnx").unlink()
    with pytest.raises(BundleError, match="file theta.onnx is missing"):
        Bundle.open(bundle_dir)


def test_unknown_version_is_refused(bundle_dir: Path) -> None:
    _edit_manifest(bundle_dir, lambda d: d.update(format_version=99))
    with pytest.raises(BundleError, match="version 99 is not supported"):
        Bundle.open(bundle_dir)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d.update(format="something-else"), "not a coalora bundle manifest"),
        (lambda d: d.pop("lora"), "no 'lora' section"),
        (lambda d: d["files"].pop("base.safetensors"), "does not list base.safetensors"),
        (lambda d: d["shipped"].update({"4b64": ["nope"]}), "unknown matrix 'nope'"),
        (
            lambda d: d["files"].update({"../x": {"sha256": "", "bytes": 0}}),
            "outside the bundle",
        ),
    ],
)
def test_bad_manifest_is_refused(bundle_dir: Path, mutate, message: str) -> None:
    _edit_manifest(bundle_dir, mutate)
    with pytest.raises(BundleError, match=message):
        Bundle.open(bundle_dir)


def test_not_a_bundle(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="no bundle at"):
        Bundle.open(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        Bundle.open(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        Bundle.open(tmp_path / "empty")


def test_failed_write_leaves_nothing(tmp_path: Path) -> None:
    contents, _ = _contents()
    contents.lora_a = {"l0.q": np.zeros((3, 96), dtype=np.float32)}  # wrong rank, missing up
    with pytest.raises(ValueError):
        write_bundle(tmp_path / "bad", contents)
    contents, _ = _contents()
    contents.tokenizer_json = tmp_path / "missing-tokenizer.json"
    with pytest.raises(FileNotFoundError):
        write_bundle(tmp_path / "bad", contents)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_kept_unless_overwritten(bundle_dir: Path) -> None:
    contents, _ = _contents(seed=1)
    with pytest.raises(FileExistsError):
        write_bundle(bundle_dir, contents)
    write_bundle(bundle_dir, contents, overwrite=True)
    assert Bundle.open(bundle_dir, verify="all").lora_rank == 4
    shutil.rmtree(bundle_dir)
