"""An onnxruntime session over a built graph without extra copies of the weights.

The graph builders can leave every large initializer out of the ModelProto
(``external=...``): the proto names each one with its shape and points it at external data
in a placeholder file that onnxruntime never reads, and the arrays themselves (views of the
memory-mapped bundle files, or the few arrays the build computes: LoRA, RoPE caches) are
handed over with ``SessionOptions.add_initializer``, which uses them in place. Measured on a
SmolLM2-135M-shaped bundle (onnxruntime 1.32): ``add_external_initializers`` copies the
arrays it is given (+280 MB), ``add_initializer`` does not; and a proto that embeds the
weights costs them three more times (numpy, proto, serialized bytes) while the session is
built. The serialized model stays a few hundred kB.

Once the session exists, the caller releases the mapped pages: MatMulNBits prepacks its
weights into buffers of its own, and the tensors read directly (the embedding table, norms)
fault back in page by page as decoding touches them. The arrays must outlive the session,
hence ``keep``.

``sources`` / ``overrides`` serve a proto that embeds its weights (the older path): every
embedded initializer that ``sources`` holds unchanged (same name, shape and dtype), and every
``overrides`` entry, is moved out of the proto the same way.
"""

from __future__ import annotations

import gc
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnxruntime as ort
from onnx import ModelProto, TensorProto, helper

from coalora.runtime.graphs._onnx import MIN_EXTERNAL_BYTES, PLACEHOLDER, external_tensor
from coalora.runtime.tempfiles import owned_tempdir

_PLACEHOLDER = PLACEHOLDER


@dataclass
class BuiltSession:
    session: ort.InferenceSession
    keep: list[Any] = field(default_factory=list)  # OrtValues onnxruntime reads, not owns
    external_bytes: int = 0  # bytes handed over as external initializers
    proto_bytes: int = 0  # size of the serialized (stripped) model


# The session's model file is written here for onnxruntime to read; see runtime/tempfiles.py.
SESSION_DIR_PREFIX = "coalora-session-"


def session_options(threads: int, config: Mapping[str, str] | None = None) -> ort.SessionOptions:
    so = ort.SessionOptions()
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
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
        t.CopyFrom(external_tensor(t.name, arr, location))
        moved[t.name] = arr
    return moved


def _ortvalue(arr: np.ndarray) -> ort.OrtValue:
    # onnxruntime needs C-contiguous, aligned memory; a misaligned view is copied once.
    if not (arr.flags.c_contiguous and arr.flags.aligned):
        arr = np.array(arr, order="C")
    return ort.OrtValue.ortvalue_from_numpy(arr)


# How often ``release`` runs while onnxruntime builds the session.
RELEASE_INTERVAL_S = 0.005


class _Releaser:
    """Calls ``fn`` every ``interval`` seconds on a thread while the block runs (onnxruntime
    releases the GIL while it builds a session), and once more at the end."""

    def __init__(self, fn: Callable[[], None] | None, interval: float = RELEASE_INTERVAL_S):
        self.fn = fn
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        assert self.fn is not None
        while not self._stop.wait(self.interval):
            self.fn()

    def __enter__(self) -> _Releaser:
        if self.fn is not None:
            self._thread = threading.Thread(target=self._run, name="coalora-release", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
        if self.fn is not None:
            self.fn()


def _referenced(proto: ModelProto, location: str) -> set[str]:
    """Names of the initializers whose data the proto says lies in ``location``."""
    out = set()
    for t in proto.graph.initializer:
        if t.data_location == TensorProto.EXTERNAL and any(
            e.key == "location" and e.value == location for e in t.external_data
        ):
            out.add(t.name)
    return out


def create_session(
    proto: ModelProto,
    *,
    threads: int,
    initializers: Mapping[str, np.ndarray] | None = None,
    sources: Mapping[str, np.ndarray] | None = None,
    overrides: Mapping[str, np.ndarray] | None = None,
    config: Mapping[str, str] | None = None,
    release: Callable[[], None] | None = None,
) -> BuiltSession:
    """A CPU session for ``proto``; consumes ``proto`` (cleared on return).

    ``initializers``: the arrays of the initializers a builder left out of the proto (its
    ``external`` dict); every placeholder reference must be served. ``sources`` and
    ``overrides``: embedded initializers to use in place (see the module doc). ``config``:
    extra session config entries. ``release``: called every few milliseconds while
    onnxruntime builds the session, and once after: ``MappedBundle.release``, so the mapped
    pages MatMulNBits has already prepacked leave the process while it prepacks the rest
    (the peak then holds one copy of the weights, not two; a page still being read simply
    faults back in from the file).
    """
    so = session_options(threads, config)
    arrays = {**(sources or {}), **(overrides or {})}
    with owned_tempdir(SESSION_DIR_PREFIX) as tmp_dir:
        tmp = str(tmp_dir)
        moved = _placeholders(proto, arrays, _PLACEHOLDER, set(overrides or {}))
        missing = sorted(set(overrides or {}) - set(moved))
        if missing:
            raise ValueError(f"the graph has no initializer {missing[0]!r} to override")
        wanted = _referenced(proto, _PLACEHOLDER)
        for name, arr in (initializers or {}).items():
            if name not in wanted:
                raise ValueError(f"the graph has no external initializer {name!r}")
            moved.setdefault(name, arr)
        unserved = sorted(wanted - set(moved))
        if unserved:
            raise ValueError(
                f"no array for the graph's external initializer {unserved[0]!r} "
                f"({len(unserved)} in all)"
            )
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
        with _Releaser(release):
            session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return BuiltSession(
        session=session,
        keep=keep,
        external_bytes=sum(a.nbytes for a in moved.values()),
        proto_bytes=size,
    )
