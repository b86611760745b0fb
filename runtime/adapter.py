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

from coalora.kernels import Configuration
from coalora.runtime.format.reader import Bundle, BundleError, SharedLora
from coalora.runtime.format.spec import THETA_FILE
from coalora.runtime.format.theta import ThetaVocab
from coalora.runtime.graphs.weights import Adapter


@dataclass
class AdapterTimings:
    theta_s: float
    fold_s: float

    @property
    def total_s(self) -> float:
        return self.theta_s + self.fold_s


class ThetaError(ValueError):
    """θ cannot be run, or what it computes cannot be an adjustment: the bundle is damaged."""


class ThetaRunner:
    """θ as an onnxruntime session; inputs are the index arrays of a configuration.

    θ is checked before it is trusted: one self-contained ONNX model (no external data, which
    could point anywhere on the device), inputs exactly the manifest's, one output; and every
    call must return finite [n_matrices, rank, rank] adjustments.
    """

    def __init__(
        self, onnx_path: str, input_names: Sequence[str], threads: int = 1, rank: int | None = None
    ):
        import onnx
        import onnxruntime as ort
        from google.protobuf.message import DecodeError

        try:
            model = onnx.load(onnx_path, load_external_data=False)
        except (DecodeError, ValueError, OSError, RuntimeError) as exc:
            raise ThetaError(f"θ is not an ONNX model ({_first_line(exc)})") from None
        tensors = [*model.graph.initializer, *_constants(model.graph)]
        if any(t.data_location == onnx.TensorProto.EXTERNAL for t in tensors):
            raise ThetaError("θ refers to external data: a bundle's θ must be one file")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                model.SerializeToString(), opts, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ThetaError(f"θ cannot be loaded ({_first_line(exc)})") from None
        graph_inputs = [i.name for i in self.session.get_inputs()]
        if sorted(graph_inputs) != sorted(input_names):
            raise ThetaError(
                f"θ's inputs {sorted(graph_inputs)} are not the manifest's {sorted(input_names)}"
            )
        outputs = self.session.get_outputs()
        if len(outputs) != 1 or len(outputs[0].shape) != 3:
            raise ThetaError("θ must have one output of rank 3 (U [matrices, rank, rank])")
        self.input_names = list(input_names)
        self.rank = rank

    def __call__(self, arrays: Mapping[str, np.ndarray]) -> np.ndarray:
        feed = {n: arrays[n] for n in self.input_names}
        try:
            (u,) = self.session.run(None, feed)
        except Exception as exc:  # onnxruntime raises its own exception types
            raise ThetaError(f"θ failed to run ({_first_line(exc)})") from None
        u = np.asarray(u, dtype=np.float32)
        n = len(next(iter(feed.values()))) if feed else 0
        r = self.rank
        if u.ndim != 3 or u.shape[0] != n or (r is not None and u.shape[1:] != (r, r)):
            raise ThetaError(f"θ returned shape {u.shape}, expected ({n}, {r}, {r})")
        if not np.isfinite(u).all():
            raise ThetaError("θ returned NaN or infinite adjustments")
        return u


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _constants(graph) -> list:
    """Tensors held by Constant nodes (they may refer to external data too)."""
    return [a.t for node in graph.node if node.op_type == "Constant" for a in node.attribute]


def fold(
    names: Sequence[str],
    u: np.ndarray,
    lora_a: Mapping[str, np.ndarray],
    lora_b: Mapping[str, np.ndarray],
    scale: float,
    low: Mapping[str, Adapter] | None = None,
) -> dict[str, Adapter]:
    """A' = (I + U_i) A_i and B' = s B_i for every matrix, in ``names`` order (U's rows).

    ``low``: the low-bit pair (A_low, B_low) of the matrices that run it; it is stacked
    under the shared pair, A' = [(I + U_i) A_i; A_low] and B' = s [B_i, B_low], since
    s B (I + U) A + s B_low A_low is one LoRA of rank r + r_low.
    """
    if u.shape[0] != len(names):
        raise ThetaError(f"θ returned {u.shape[0]} adjustments for {len(names)} matrices")
    low = low or {}
    out: dict[str, Adapter] = {}
    for i, name in enumerate(names):
        a, b = lora_a[name], lora_b[name]
        a = a + u[i] @ a
        if name in low:
            a = np.concatenate([a, low[name][0]], axis=0)
            b = np.concatenate([b, low[name][1]], axis=1)
        folded = (
            a.astype(np.float32, copy=False),
            (b * np.float32(scale)).astype(np.float32, copy=False),
        )
        if not (np.isfinite(folded[0]).all() and np.isfinite(folded[1]).all()):
            raise ThetaError(f"the folded adapter of {name} is not finite")
        out[name] = folded
    return out


def generate_adapters(
    theta: ThetaRunner,
    arrays: Mapping[str, np.ndarray],
    names: Sequence[str],
    lora_a: Mapping[str, np.ndarray],
    lora_b: Mapping[str, np.ndarray],
    scale: float,
    low: Mapping[str, Adapter] | None = None,
) -> tuple[dict[str, Adapter], AdapterTimings]:
    t0 = time.perf_counter()
    u = theta(arrays)
    t1 = time.perf_counter()
    adapters = fold(names, u, lora_a, lora_b, scale, low)
    t2 = time.perf_counter()
    return adapters, AdapterTimings(theta_s=t1 - t0, fold_s=t2 - t1)


def open_theta(bundle: Bundle) -> ThetaRunner:
    """The bundle's θ, checked (``ThetaRunner``); a bad one is a ``BundleError``."""
    try:
        return ThetaRunner(
            str(bundle.theta_path()), bundle.theta_inputs, threads=1, rank=bundle.lora_rank
        )
    except ThetaError as exc:
        raise BundleError(f"{bundle.root}: {THETA_FILE}: {exc}") from None


def bundle_adapters(
    bundle: Bundle,
    theta: ThetaRunner,
    lora: SharedLora,
    config: Configuration,
) -> tuple[dict[str, Adapter], AdapterTimings]:
    """``config``'s adapter from the bundle's θ and shared LoRA (A, B per matrix, and the
    low-bit pair where ``config`` runs it); a damaged θ vocabulary or a non-finite
    adjustment is a ``BundleError``."""
    try:
        arrays = ThetaVocab.from_dict(bundle.theta_vocab).encode(config, bundle.space)
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{bundle.root}: θ vocabulary: {exc}") from None
    names = [m.name for m in bundle.space.matrices]
    ranks = bundle.lora_ranks
    low = {n: (lora.a_low[n], lora.b_low[n]) for n in names if ranks.runs_low(config[n])}
    try:
        return generate_adapters(theta, arrays, names, lora.a, lora.b, bundle.lora_scale, low)
    except ThetaError as exc:
        raise BundleError(f"{bundle.root}: {THETA_FILE}: {exc}") from None
