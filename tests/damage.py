"""Damaged and hostile bundles, as whoever can write a bundle can make them: the catalogue
``tests/test_bundle_hardening.py`` and ``benchmarks/robustness.py`` both run. Each entry
changes a copy of a bundle in place.

Most damage is "rehashed": the file is changed and the manifest's hash updated, so only the
checks beyond hashes stand in the way.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np

from coalora.runtime.format.spec import (
    MANIFEST,
    PARETO_FILE,
    QUANT_DIR,
    THETA_FILE,
    TOKENIZER_FILE,
    FileEntry,
    Key,
)

Damage = Callable[[Path], None]


def rehash(root: Path, rel: str) -> None:
    manifest = json.loads((root / MANIFEST).read_text())
    data = (root / rel).read_bytes()
    entry = {FileEntry.SHA256: hashlib.sha256(data).hexdigest(), FileEntry.BYTES: len(data)}
    manifest[Key.FILES][rel] = entry
    (root / MANIFEST).write_text(json.dumps(manifest))


def edit_manifest(change: Callable[[dict], None]) -> Damage:
    def damage(root: Path) -> None:
        manifest = json.loads((root / MANIFEST).read_text())
        change(manifest)
        (root / MANIFEST).write_text(json.dumps(manifest))

    return damage


def set_path(path: str, value) -> Damage:
    keys = path.split(".")

    def change(m: dict) -> None:
        for k in keys[:-1]:
            m = m[k]
        m[keys[-1]] = value

    return edit_manifest(change)


def first_quant(root: Path) -> str:
    """The bundle's first option file (``quant/2b64.safetensors`` on the demo bundle)."""
    manifest = json.loads((root / MANIFEST).read_text())
    return sorted(rel for rel in manifest[Key.FILES] if rel.startswith(QUANT_DIR + "/"))[0]


FIRST_QUANT = ""  # in place of a file name: the bundle's first option file


def edit_header(rel: str, change: Callable[[dict], None]) -> Damage:
    def damage(root: Path) -> None:
        rel_ = rel or first_quant(root)
        raw = (root / rel_).read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        change(header)
        text = json.dumps(header).encode()
        (root / rel_).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
        rehash(root, rel_)

    return damage


def first_quant_tensor(header: dict, part: str) -> dict:
    return next(v for k, v in header.items() if k.endswith(part))


def _transpose(header: dict) -> None:
    spec = first_quant_tensor(header, ".qweight")
    spec["shape"] = [spec["shape"][1], spec["shape"][0], spec["shape"][2]]


def _dtype(header: dict) -> None:
    first_quant_tensor(header, ".scales")["dtype"] = "I32"


def _huge(header: dict) -> None:
    first_quant_tensor(header, ".scales")["shape"] = [2**62, 2**62]


def _overlap(header: dict) -> None:
    specs = sorted(
        (v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"]
    )
    a, b = specs[0], specs[1]
    size = b["data_offsets"][1] - b["data_offsets"][0]
    b["data_offsets"] = [a["data_offsets"][0], a["data_offsets"][0] + size]


def _deep_header(root: Path, rel: str) -> None:
    """A header whose metadata nests 5000 levels deep (json.dumps itself cannot write one)."""
    rel = rel or first_quant(root)
    raw = (root / rel).read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + n].rstrip(b" ")[:-1] + b', "__metadata__": ' + _deep().encode() + b"}"
    (root / rel).write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    rehash(root, rel)


def _deep(n: int = 5000) -> str:
    return "[" * n + "]" * n


def write_file(rel: str, data: bytes | Callable[[Path], bytes]) -> Damage:
    def damage(root: Path) -> None:
        (root / rel).write_bytes(data(root) if callable(data) else data)
        rehash(root, rel)

    return damage


def _identity_onnx(root: Path) -> bytes:
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "other", [x], [y])
    return helper.make_model(graph).SerializeToString()


def _theta_times(factor: float, reshape: bool = False) -> Callable[[Path], bytes]:
    """θ with one more node at its output: U * factor (NaN for factor NaN), or reshaped."""

    def make(root: Path) -> bytes:
        import onnx
        from onnx import helper, numpy_helper

        model = onnx.load(str(root / THETA_FILE))
        out = model.graph.output[0]
        inner = out.name + "_inner"
        for node in model.graph.node:
            node.output[:] = [inner if o == out.name else o for o in node.output]
        if reshape:
            shape = numpy_helper.from_array(np.array([-1, 2, 2], dtype=np.int64), "shape_c")
            model.graph.initializer.append(shape)
            model.graph.node.append(helper.make_node("Reshape", [inner, "shape_c"], [out.name]))
        else:
            k = numpy_helper.from_array(np.array(factor, dtype=np.float32), "factor_c")
            model.graph.initializer.append(k)
            model.graph.node.append(helper.make_node("Mul", [inner, "factor_c"], [out.name]))
        return model.SerializeToString()

    return make


def _theta_external(root: Path) -> bytes:
    """θ whose first weight is "external data" at a path outside the bundle."""
    import onnx
    from onnx import TensorProto

    model = onnx.load(str(root / THETA_FILE))
    t = model.graph.initializer[0]
    t.ClearField("raw_data")
    t.ClearField("float_data")
    t.data_location = TensorProto.EXTERNAL
    entry = t.external_data.add()
    entry.key, entry.value = "location", "../../../../etc/passwd"
    return model.SerializeToString()


def _symlink(rel: str, target: str) -> Damage:
    def damage(root: Path) -> None:
        (root / rel).unlink()
        (root / rel).symlink_to(target)
        rehash(root, rel)

    return damage


def _symlink_dir(root: Path) -> None:
    outside = root.parent / f"{root.name}-outside-quant"
    shutil.copytree(root / "quant", outside)
    shutil.rmtree(root / "quant")
    (root / "quant").symlink_to(outside)


MANIFEST_CASES: dict[str, Damage] = {
    "files-list": set_path("files", ["base.safetensors"]),
    "file-entry-string": edit_manifest(
        lambda m: m["files"].update({k: "x" for k in list(m["files"])[:1]})
    ),
    "architecture-null": set_path("architecture", None),
    "rank-zero": set_path("lora.rank", 0),
    "rank-text": set_path("lora.rank", "abc"),
    "rank-wrong": set_path("lora.rank", 3),
    "alpha-nan": edit_manifest(lambda m: m["lora"].update(alpha=float("nan"))),
    "theta-inputs-null": set_path("theta.inputs", None),
    "eos-text": set_path("architecture.eos_token_ids", ["x"]),
    "eos-outside-vocab": set_path("architecture.eos_token_ids", [10**9]),
    "heads-zero": set_path("architecture.config.num_attention_heads", 0),
    "kv-heads-not-dividing": set_path("architecture.config.num_key_value_heads", 2),
    "rope-type-null": set_path("architecture.config.rope_parameters.rope_type", None),
    "rope-theta-zero": set_path("architecture.config.rope_parameters.rope_theta", 0),
    "family-unknown": set_path("architecture.family", "gpt-neo"),
    "sha-not-hex": edit_manifest(
        lambda m: next(iter(m["files"].values())).update(sha256="zz" * 32)
    ),
    "deep-manifest": lambda root: (root / MANIFEST).write_text(_deep()),
    "deep-pareto": write_file(PARETO_FILE, _deep().encode()),
}
TENSOR_CASES: dict[str, Damage] = {
    "transposed": edit_header(FIRST_QUANT, _transpose),
    "dtype": edit_header(FIRST_QUANT, _dtype),
    "huge-shape": edit_header(FIRST_QUANT, _huge),
    "overlap": edit_header(FIRST_QUANT, _overlap),
    "deep-header": lambda root: _deep_header(root, FIRST_QUANT),
    "lora-transposed": edit_header(
        "lora.safetensors",
        lambda h: next(v for k, v in h.items() if k.endswith(".A")).update(
            shape=list(reversed(next(v for k, v in h.items() if k.endswith(".A"))["shape"]))
        ),
    ),
}
THETA_CASES: dict[str, Damage] = {
    "garbage": write_file(THETA_FILE, b"\x08\x07garbage" * 40),
    "empty": write_file(THETA_FILE, b""),
    "truncated": write_file(THETA_FILE, lambda r: (r / THETA_FILE).read_bytes()[:300]),
    "other-model": write_file(THETA_FILE, _identity_onnx),
    "nan-output": write_file(THETA_FILE, _theta_times(float("nan"))),
    "wrong-shape": write_file(THETA_FILE, _theta_times(1.0, reshape=True)),
    "external-data": write_file(THETA_FILE, _theta_external),
}
LINK_CASES: dict[str, Damage] = {
    "tokenizer-to-passwd": _symlink(TOKENIZER_FILE, "/etc/passwd"),
    "pareto-outside": _symlink(PARETO_FILE, "/etc/hostname"),
    "quant-dir-outside": _symlink_dir,
}
ALL = {**MANIFEST_CASES, **TENSOR_CASES, **THETA_CASES, **LINK_CASES}
