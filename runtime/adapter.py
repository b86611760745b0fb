"""On-device adapter generation: θ(configuration) through onnxruntime, then fold.

θ maps every matrix's option to U [r, r] in one call. Since ΔW = s·B(I+U)A, U folds into A
once, A' = (I+U)A, and the scale folds into B, B' = s·B: what remains is an ordinary LoRA
adapter (x A'^T B'^T), with no per-token cost for θ.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from coalora.runtime.graphs.weights import Adapter


@dataclass
class AdapterTimings:
    theta_s: float
    fold_s: float

    @property
    def total_s(self) -> float:
        return self.theta_s + self.fold_s


class ThetaRunner:
    """θ as an onnxruntime session; inputs are the index arrays of a configuration."""

    def __init__(self, onnx_path: str, input_names: Sequence[str], threads: int = 1):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        self.session = ort.InferenceSession(onnx_path, opts, providers=["CPUExecutionProvider"])
        graph_inputs = {i.name for i in self.session.get_inputs()}
        missing = sorted(set(graph_inputs) - set(input_names))
        if missing:
            raise ValueError(f"θ graph expects inputs {missing} the manifest does not name")
        self.input_names = [n for n in input_names if n in graph_inputs]

    def __call__(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        feed = {n: arrays[n] for n in self.input_names}
        (u,) = self.session.run(None, feed)
        return np.asarray(u, dtype=np.float32)


def fold(
    names: Sequence[str],
    u: np.ndarray,
    lora_a: Mapping[str, np.ndarray],
    lora_b: Mapping[str, np.ndarray],
    scale: float,
) -> dict[str, Adapter]:
    """A' = (I + U_i) A_i and B' = s B_i for every matrix, in ``names`` order (U's rows)."""
    if u.shape[0] != len(names):
        raise ValueError(f"θ returned {u.shape[0]} adjustments for {len(names)} matrices")
    out: dict[str, Adapter] = {}
    for i, name in enumerate(names):
        a = lora_a[name]
        out[name] = (
            (a + u[i] @ a).astype(np.float32, copy=False),
            (lora_b[name] * np.float32(scale)).astype(np.float32, copy=False),
        )
    return out


def generate_adapters(
    theta: ThetaRunner,
    arrays: Mapping[str, np.ndarray],
    names: Sequence[str],
    lora_a: Mapping[str, np.ndarray],
    lora_b: Mapping[str, np.ndarray],
    scale: float,
) -> tuple[dict[str, Adapter], AdapterTimings]:
    t0 = time.perf_counter()
    u = theta(arrays)
    t1 = time.perf_counter()
    adapters = fold(names, u, lora_a, lora_b, scale)
    t2 = time.perf_counter()
    return adapters, AdapterTimings(theta_s=t1 - t0, fold_s=t2 - t1)
