"""The compute accountant: how fast a stored configuration decodes on this device.

A decode step of the runtime's graph reads every quantized matrix once, the LM head, the LoRA
side branch and the KV cache so far, and dispatches a few hundred nodes. Its time is
predicted from what it reads and runs:

    sum over MatMulNBits weights    K * N * seconds_per_weight[option]
  + fp32 values read                (an fp32 head, the KV cache) * fp32_seconds_per_value
  + graph nodes                     count * node_seconds

``measure`` finds the three costs on this machine in well under a second: a chain of
random-code MatMulNBits nodes per option (codes do not change a kernel's speed), one fp32
Gemm at one token, and a chain of tiny nodes, run round-robin so that no weight stays in
the CPU's caches between two of its runs, as in decoding, where the whole model passes
through memory every token. The result is cached per (CPU, threads, accuracy level,
onnxruntime version) in ``$XDG_CACHE_HOME/coalora/device-speed.json``. A device profile
(planning for another board) predicts from its ``memory_bandwidth_gbs`` instead: bytes read
over bandwidth, plus ``PROFILE_NODE_SECONDS`` per node.

``DecodeWork`` counts the work of one configuration from the memory accountant's fused groups
(``plan.Accountant``), so both accountants see the graph the builder makes.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from coalora.kernels.matmulnbits import DEFAULT_ACCURACY_LEVEL, MatMulNBitsWeights, exact_as_fp32
from coalora.kernels.options import QuantOption
from coalora.runtime.plan import Accountant

__all__ = [
    "DecodeWork",
    "DeviceSpeed",
    "SpeedError",
    "decode_work",
    "device_speed",
    "measure",
    "cached_speed",
    "options_read",
    "record_decode",
]

# One matrix per option: K = BENCH_DIM inputs, BENCH_N outputs (8M weights, 4 MB at 4 bits):
# wide enough that both threads get whole tiles, as in a model's large projections.
BENCH_DIM = 2048
BENCH_N = 4096
BENCH_ROUNDS = 7
# A slow board (or an emulated one) stops a probe after this long, with at least MIN_ROUNDS.
PROBE_BUDGET_S = 0.2
MIN_ROUNDS = 3
# Written between two timed runs: larger than the last-level caches of the boards we serve.
FLUSH_BYTES = 32 * 2**20
TINY_DIM = 64
# One fp32 Gemm at one token over a [FP32_ROWS, BENCH_DIM] matrix (16 MB).
FP32_ROWS = 2048
TINY_NODES = 128
# Per-node dispatch where nothing was measured (a profile of another board): the x86-64
# figure of ``measure`` on 2 threads (~8 us) rounded up, since smaller cores dispatch slower.
PROFILE_NODE_SECONDS = 10e-6
CACHE_FILE = "device-speed.json"
CACHE_VERSION = 1
CALIBRATION_TOKENS = 32  # decoded tokens a run needs before it calibrates the costs
MAX_CACHE_BYTES = 2**20  # a few hundred bytes per machine key; anything larger is not ours


class SpeedError(ValueError):
    """A speed prediction was asked of a bundle or configuration it does not cover."""


# -- what one decode step reads and runs ---------------------------------------------------------
@dataclass(frozen=True)
class DecodeWork:
    """The reads and nodes of one decode step at one position."""

    weights: Mapping[QuantOption, int]  # MatMulNBits weights read, per option
    fp32_values: int  # fp32 values read: an fp32 head and LoRA, the KV cache
    nodes: int  # nodes of the graph (as built, before onnxruntime's own fusions)


# Nodes the decoder graph holds besides its linears (runtime/graphs/llama.py): the mask
# prelude (6), the embedding gather, the first norm and the last-position slice; per layer
# attention, two skip-norms and the SiLU gate (Sigmoid, Mul, Mul); the head's nodes.
_GRAPH_NODES = 9
_LAYER_NODES = 6
_FP32_HEAD_NODES = 5  # Reshape, Gemm, Shape, Concat, Reshape
_QUANT_HEAD_NODES = 2  # MatMulNBits, Identity
_LORA_NODES = 3  # x @ A, t @ B, y + u


def decode_work(
    accountant: Accountant, arch: Any, config: Mapping[str, QuantOption], position: int
) -> DecodeWork:
    """What decoding one token at ``position`` (tokens already in the cache) reads and runs."""
    from coalora.runtime.graphs.llama import LlamaArch
    from coalora.runtime.graphs.weights import LORA_A_OPTION, LORA_B_OPTION

    if not isinstance(arch, LlamaArch):
        raise SpeedError("decode speed is predicted for causal-lm bundles only")
    space = accountant.bundle.space
    weights: dict[QuantOption, int] = {}
    fp32 = nodes = 0

    def add(option: QuantOption, n: int) -> None:
        weights[option] = weights.get(option, 0) + n

    level = accountant.accuracy_level
    for m in space.matrices:
        if exact_as_fp32(config[m.name].bits, level):
            fp32 += m.in_features * m.out_features
            nodes += m.name in accountant.biased  # its bias is an Add of its own
        else:
            add(config[m.name], m.in_features * m.out_features)
    groups = accountant.fused_groups(config)
    ranks = accountant.bundle.lora_ranks
    nodes += _GRAPH_NODES + arch.num_hidden_layers * _LAYER_NODES + len(groups)
    # a fused gate/up output is split in two
    nodes += sum(1 for g in groups if len(g) > 1 and g[0].endswith("gate_proj"))
    if ranks.rank:
        nodes += _LORA_NODES * len(groups)
        for g in groups:
            rank = ranks.of(config[n] for n in g)
            k = space.matrix(g[0]).in_features
            a, b = k * rank * len(g), rank * len(g) * sum(space.matrix(n).out_features for n in g)
            if accountant.lora_bits == 32 or exact_as_fp32(LORA_A_OPTION.bits, level):
                fp32 += a + b
            else:
                add(LORA_A_OPTION, a)
                add(LORA_B_OPTION, b)
    head = arch.vocab_size * arch.hidden_size
    head_option = accountant.bundle.head_option(config)
    if head_option and exact_as_fp32(head_option.bits, level):
        fp32 += head
        nodes += _QUANT_HEAD_NODES
    elif head_option:
        add(head_option, head)
        nodes += _QUANT_HEAD_NODES
    else:
        fp32 += head
        nodes += _FP32_HEAD_NODES
    # attention reads the keys and values of every cached position
    fp32 += accountant.kv_bytes_per_token // 4 * max(position, 0)
    return DecodeWork(weights=weights, fp32_values=fp32, nodes=nodes)


def options_read(accountant: Accountant) -> set[QuantOption]:
    """Every MatMulNBits option a decode step of the bundle may read: the configuration
    space's, the LoRA branch's and a quantized head's (every option of a configured one)."""
    from coalora.runtime.graphs.weights import LORA_A_OPTION, LORA_B_OPTION

    out = set(accountant.bundle.space.options)
    if accountant.bundle.lora_rank and accountant.lora_bits != 32:
        out |= {LORA_A_OPTION, LORA_B_OPTION}
    if accountant.bundle.lm_head:
        out.add(QuantOption.parse(accountant.bundle.lm_head))
    out |= set(accountant.bundle.space.head_options)
    # what an exact graph multiplies dequantized is fp32 values, not MatMulNBits
    return {o for o in out if not exact_as_fp32(o.bits, accountant.accuracy_level)}


# -- the device's costs ----------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceSpeed:
    """Seconds per weight read by MatMulNBits per option, per fp32 value, and per node."""

    seconds_per_weight: Mapping[str, float]  # option name -> seconds
    fp32_seconds_per_value: float
    node_seconds: float
    source: str  # where the figures come from, for the user
    bandwidth_bytes_per_s: float | None = None  # a profile's: prices options not measured
    measured_s: float = 0.0
    # measured / predicted tok/s of a real decode on this machine (``record_decode``): what
    # the probes miss (attention, norms, the framework between nodes) is close to one factor
    calibration: float = 1.0
    extra: dict[str, Any] = field(default_factory=dict)

    def seconds(self, work: DecodeWork) -> float:
        """Predicted seconds of one decode step."""
        t = work.fp32_values * self.fp32_seconds_per_value + work.nodes * self.node_seconds
        for option, n in work.weights.items():
            t += n * self.weight_seconds(option)
        return t

    def tok_s(self, work: DecodeWork) -> float:
        return self.calibration / self.seconds(work)

    def prices(self, work: DecodeWork) -> bool:
        """Whether every option ``work`` reads has a cost here (measured, or by bandwidth)."""
        return bool(self.bandwidth_bytes_per_s) or all(
            o.name in self.seconds_per_weight for o in work.weights
        )

    def weight_seconds(self, option: QuantOption) -> float:
        s = self.seconds_per_weight.get(option.name)
        if s is not None:
            return s
        if self.bandwidth_bytes_per_s:
            return _bytes_per_weight(option) / self.bandwidth_bytes_per_s
        raise SpeedError(f"no decode cost measured for option {option.name}")

    def to_json(self) -> dict[str, Any]:
        return {
            "seconds_per_weight": dict(sorted(self.seconds_per_weight.items())),
            "fp32_seconds_per_value": self.fp32_seconds_per_value,
            "node_seconds": self.node_seconds,
            "source": self.source,
            "measured_s": self.measured_s,
            "calibration": self.calibration,
        }

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> DeviceSpeed:
        per = d["seconds_per_weight"]
        if not isinstance(per, dict) or not all(
            isinstance(k, str) and _positive(v) for k, v in per.items()
        ):
            raise ValueError("seconds_per_weight must map option names to positive numbers")
        fp32, node = d["fp32_seconds_per_value"], d["node_seconds"]
        calibration = d.get("calibration", 1.0)
        if not (_positive(fp32) and _positive(node) and _positive(calibration)):
            raise ValueError("costs must be positive numbers")
        return cls(
            seconds_per_weight={k: float(v) for k, v in per.items()},
            fp32_seconds_per_value=float(fp32),
            node_seconds=float(node),
            source=str(d.get("source", "cached"))
            + (f", calibrated x{calibration:.2f} by a real decode" if calibration != 1.0 else ""),
            measured_s=float(d.get("measured_s", 0.0)),
            calibration=float(calibration),
        )

    @classmethod
    def from_bandwidth(cls, gbs: float, source: str) -> DeviceSpeed:
        """Costs of a board known only by its memory bandwidth (a device profile)."""
        bw = gbs * 1e9
        return cls(
            seconds_per_weight={},
            fp32_seconds_per_value=4.0 / bw,
            node_seconds=PROFILE_NODE_SECONDS,
            source=source,
            bandwidth_bytes_per_s=bw,
        )


def _positive(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < float("inf")


def _bytes_per_weight(option: QuantOption) -> float:
    return option.nbytes(1, option.block_size) / option.block_size


# -- measuring -------------------------------------------------------------------------------------
def _random_weights(option: QuantOption, k: int, n: int, rng: np.random.Generator) -> Any:
    blocks = option.n_blocks(k)
    zp_row = -(-blocks * option.bits // 8)
    return MatMulNBitsWeights(
        b=rng.integers(0, 256, (n, blocks, option.block_size * option.bits // 8), dtype=np.uint8),
        scales=np.full(n * blocks, 1e-3, dtype=np.float32),
        zero_points=rng.integers(0, 256, n * zp_row, dtype=np.uint8),
        K=k,
        N=n,
        bits=option.bits,
        block_size=option.block_size,
    )


def _matmulnbits(x: str, y: str, prefix: str, w: Any, level: int, arrays: dict) -> Any:
    from onnx import helper

    from coalora.kernels.matmulnbits import DOMAIN

    names = [f"{prefix}.qweight", f"{prefix}.scales", f"{prefix}.qzeros"]
    arrays.update(zip(names, (w.b, w.scales, w.zero_points), strict=True))
    return helper.make_node("MatMulNBits", [x, *names], [y], domain=DOMAIN, **w.attributes(level))


def _session(nodes: list[Any], arrays: dict[str, np.ndarray], k: int, n: int, threads: int) -> Any:
    # The runtime's own session path (weights handed over in place, not through the proto).
    from onnx import TensorProto, helper

    from coalora.kernels.matmulnbits import DOMAIN
    from coalora.runtime.graphs._onnx import external_tensor
    from coalora.runtime.session import create_session

    graph = helper.make_graph(
        nodes,
        "coalora_speed_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n])],
        initializer=[external_tensor(name, a) for name, a in arrays.items()],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)]
    )
    return create_session(model, threads=threads, initializers=arrays)


def _option_probe(option: QuantOption, threads: int, level: int, rng: np.random.Generator) -> Any:
    arrays: dict[str, np.ndarray] = {}
    w = _random_weights(option, BENCH_DIM, BENCH_N, rng)
    return _session(
        [_matmulnbits("x", "y", "w", w, level, arrays)], arrays, BENCH_DIM, BENCH_N, threads
    )


def _fp32_probe(threads: int) -> Any:
    from onnx import helper

    w = np.full((FP32_ROWS, BENCH_DIM), 1e-3, dtype=np.float32)
    node = helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)
    return _session([node], {"w": w}, BENCH_DIM, FP32_ROWS, threads)


def _nodes_probe(threads: int, level: int, rng: np.random.Generator) -> Any:
    # Alternating tiny MatMulNBits and Add, like the LoRA branch: dispatch is all they cost.
    from onnx import helper

    nodes: list[Any] = []
    arrays: dict[str, np.ndarray] = {"one": np.ones((1, TINY_DIM), dtype=np.float32)}
    x = "x"
    for i in range(TINY_NODES // 2):
        w = _random_weights(QuantOption(4, 32), TINY_DIM, TINY_DIM, rng)
        y = "y" if i == TINY_NODES // 2 - 1 else f"s{i}"
        nodes += [
            _matmulnbits(x, f"t{i}", f"tiny{i}", w, level, arrays),
            helper.make_node("Add", [f"t{i}", "one"], [y]),
        ]
        x = y
    return _session(nodes, arrays, TINY_DIM, TINY_DIM, threads)


def _median_run(built: Any, width: int, flush: np.ndarray) -> float:
    """Median seconds of one run, each after reading ``flush`` evicted the caches (in
    decoding the whole model passes through memory between two reads of one weight); one
    warm-up run. Read, not written: evicting dirty lines would bill the probe for writes."""
    x = {"x": np.ones((1, width), np.float32)}
    built.session.run(None, x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < BENCH_ROUNDS and (
        len(times) < MIN_ROUNDS or time.perf_counter() - start < PROBE_BUDGET_S
    ):
        int(flush.sum())
        t0 = time.perf_counter()
        built.session.run(None, x)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(
    options: Iterable[QuantOption], threads: int, accuracy_level: int = DEFAULT_ACCURACY_LEVEL
) -> DeviceSpeed:
    """This machine's decode costs for ``options`` (medians over a few runs)."""
    t_start = time.perf_counter()
    rng = np.random.default_rng(0)
    # written once so that its pages are real (fresh zero pages all map one physical page)
    flush = np.ones(FLUSH_BYTES // 8, dtype=np.uint64)
    node_s = _median_run(_nodes_probe(threads, accuracy_level, rng), TINY_DIM, flush)
    node_s /= TINY_NODES
    per_weight: dict[str, float] = {}
    for o in sorted(set(options), key=lambda o: (o.bits, o.block_size)):
        t = _median_run(_option_probe(o, threads, accuracy_level, rng), BENCH_DIM, flush)
        per_weight[o.name] = max(t - node_s, 1e-12) / (BENCH_DIM * BENCH_N)
    t = _median_run(_fp32_probe(threads), BENCH_DIM, flush)
    fp32 = max(t - node_s, 1e-12) / (FP32_ROWS * BENCH_DIM)
    return DeviceSpeed(
        seconds_per_weight=per_weight,
        fp32_seconds_per_value=fp32,
        node_seconds=node_s,
        source=f"measured on this machine, {threads} threads",
        measured_s=time.perf_counter() - t_start,
    )


# -- the cache -------------------------------------------------------------------------------------
def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "coalora" / CACHE_FILE


def _machine_key(threads: int, accuracy_level: int) -> str:
    import onnxruntime as ort

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu part")):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}|threads={threads}|level={accuracy_level}|onnxruntime={ort.__version__}"


def _read_cache(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > MAX_CACHE_BYTES:
            return {}
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CACHE_VERSION:
        return {}
    entries = data.get("machines")
    return entries if isinstance(entries, dict) else {}


def _speed_of(entry: Any) -> DeviceSpeed | None:
    """A cache entry as costs, or None where it is damaged (then measured again)."""
    if entry is None:
        return None
    try:
        return DeviceSpeed.from_json(entry)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None


def cached_speed(threads: int, accuracy_level: int = DEFAULT_ACCURACY_LEVEL) -> DeviceSpeed | None:
    """This machine's cached costs, if any (nothing is measured)."""
    return _speed_of(_read_cache(cache_path()).get(_machine_key(threads, accuracy_level)))


def device_speed(
    options: Iterable[QuantOption], threads: int, accuracy_level: int = DEFAULT_ACCURACY_LEVEL
) -> DeviceSpeed:
    """This machine's costs for ``options``: from the cache, measuring what it lacks."""
    wanted = set(options)
    path = cache_path()
    key = _machine_key(threads, accuracy_level)
    machines = _read_cache(path)
    cached = _speed_of(machines.get(key))
    if cached is not None and all(o.name in cached.seconds_per_weight for o in wanted):
        return cached
    # Everything again (not only the missing options): the costs of one run belong together.
    known = {QuantOption.parse(n) for n in (cached.seconds_per_weight if cached else {})}
    speed = measure(wanted | known, threads, accuracy_level)
    machines[key] = speed.to_json()
    _write_cache(path, machines)
    return speed


def record_decode(
    threads: int, accuracy_level: int, predicted_tok_s: float, measured_tok_s: float
) -> None:
    """Calibrate this machine's cached costs by one real decode (the first one long enough,
    ``CALIBRATION_TOKENS``), so later predictions carry what the probes cannot see."""
    path = cache_path()
    key = _machine_key(threads, accuracy_level)
    machines = _read_cache(path)
    entry = machines.get(key)
    if not isinstance(entry, dict) or entry.get("calibration", 1.0) != 1.0:
        return
    if not (_positive(predicted_tok_s) and _positive(measured_tok_s)):
        return
    # the entry's own prediction was made at calibration 1.0
    entry["calibration"] = measured_tok_s / predicted_tok_s
    _write_cache(path, machines)


def _write_cache(path: Path, machines: dict[str, Any]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(
            json.dumps({"version": CACHE_VERSION, "machines": machines}, indent=1), "utf-8"
        )
        tmp.replace(path)
    except OSError:
        pass  # a read-only home: measured again next time, which is only slower
