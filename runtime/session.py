"""An onnxruntime session over a built graph without extra copies of the weights.

The graph builders embed every weight in the ModelProto. Handed over as bytes, a 135M model
exists several times during session creation (numpy, proto, serialized bytes, onnxruntime's
own tensors) before MatMulNBits prepacks yet another copy. Measured on a SmolLM2-135M-shaped
bundle (onnxruntime 1.32): ``add_external_initializers`` copies the arrays it is given
(+280 MB), while ``add_initializer`` uses them in place (+87 MB: the MatMulNBits prepacking
alone). So every initializer that is a plain view of a memory-mapped bundle file
(``sources``: same name, shape and dtype), and every LoRA override, becomes an
``add_initializer`` override. The proto still has to name each one with its shape: it
points to external data in a sparse placeholder file that onnxruntime never reads (the
override wins), so the serialized model stays a few MB. Once the session exists, the caller
releases the mapped pages: prepacked kernels hold their own copy, and the tensors read
directly (the embedding table, norms) fault back in page by page as decoding touches them.
The overridden arrays must outlive the session, hence ``keep``.
"""

from __future__ import annotations

import gc
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import ModelProto, TensorProto, helper

# Below this an initializer is not worth an external reference.
MIN_EXTERNAL_BYTES = 1024
_PLACEHOLDER = "placeholder.bin"


@dataclass
class BuiltSession:
    session: ort.InferenceSession
    keep: list[Any] = field(default_factory=list)  # OrtValues onnxruntime reads, not owns
    external_bytes: int = 0  # bytes handed over as external initializers
    proto_bytes: int = 0  # size of the serialized (stripped) model


def session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


def _matches(t: TensorProto, arr: np.ndarray) -> bool:
    if tuple(t.dims) != arr.shape:
        return False
    try:
        return helper.tensor_dtype_to_np_dtype(t.data_type) == arr.dtype
    except (KeyError, ValueError):
        return False


def _placeholders(
    proto: ModelProto, arrays: Mapping[str, np.ndarray], location: str, always: set[str]
) -> dict[str, np.ndarray]:
    """Point every initializer ``arrays`` holds unchanged at the placeholder file (in place);
    returns the ones moved."""
    moved: dict[str, np.ndarray] = {}
    for t in proto.graph.initializer:
        arr = arrays.get(t.name)
        if arr is None or not _matches(t, arr):
            continue
        if arr.nbytes < MIN_EXTERNAL_BYTES and t.name not in always:
            continue
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        del t.external_data[:]
        for key, value in (("location", location), ("offset", "0"), ("length", str(arr.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        moved[t.name] = arr
    return moved


def _ortvalue(arr: np.ndarray) -> ort.OrtValue:
    # onnxruntime needs C-contiguous, aligned memory; a misaligned view is copied once.
    if not (arr.flags.c_contiguous and arr.flags.aligned):
        arr = np.array(arr, order="C")
    return ort.OrtValue.ortvalue_from_numpy(arr)


def create_session(
    proto: ModelProto,
    *,
    threads: int,
    sources: Mapping[str, np.ndarray] | None = None,
    overrides: Mapping[str, np.ndarray] | None = None,
) -> BuiltSession:
    """A CPU session for ``proto`` whose ``sources`` and ``overrides`` initializers are used
    in place; consumes ``proto`` (cleared on return)."""
    so = session_options(threads)
    arrays = {**(sources or {}), **(overrides or {})}
    with tempfile.TemporaryDirectory(prefix="coalora-") as tmp:
        moved = _placeholders(proto, arrays, _PLACEHOLDER, set(overrides or {}))
        missing = sorted(set(overrides or {}) - set(moved))
        if missing:
            raise ValueError(f"the graph has no initializer {missing[0]!r} to override")
        with open(os.path.join(tmp, _PLACEHOLDER), "wb") as fh:
            # Sparse: takes no disk and is never read.
            fh.truncate(max((a.nbytes for a in moved.values()), default=0))
        path = os.path.join(tmp, "model.onnx")
        data = proto.SerializeToString()
        proto.Clear()
        with open(path, "wb") as fh:
            fh.write(data)
        size = len(data)
        del data
        keep: list[Any] = []
        for name, arr in moved.items():
            value = _ortvalue(arr)
            so.add_initializer(name, value)
            keep.append(value)
        gc.collect()
        session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return BuiltSession(
        session=session,
        keep=keep,
        external_bytes=sum(a.nbytes for a in moved.values()),
        proto_bytes=size,
    )
