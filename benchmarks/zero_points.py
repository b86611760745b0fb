"""Can a group-constant adapter fold into MatMulNBits' zero points? Its speed says no.

A QA-LoRA-style adapter is constant within each quantization block along K, so it folds
exactly into the block's zero point: s * (q - z) + d = s * (q - (z - d / s)). The shifted
zero point is no longer an integer, so MatMulNBits needs float zero points (the same type as
its scales). This measures one MatMulNBits at decode shape (one row of activations, the
runtime's session options and accuracy level, 2 threads) with the uint8 zero points the
runtime stores against float zero points, in interleaved rounds, at SmolLM2's matrix shapes
and the 4-bit and 2-bit options; 8-bit is tried too.

    python -m benchmarks.zero_points

writes benchmarks/results/zero_points.md and .json; ``summary`` holds
``float_over_uint8_min`` / ``_max`` (time with float zero points / with uint8, over every
measured case) and ``eight_bit_float_zero_points`` (what onnxruntime says to 8 bits).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from benchmarks.common import (
    RESULTS,
    interleaved,
    machine,
    machine_md,
    median,
    read_result,
    report_only_parser,
    write_result,
)

STEM = "zero_points"
THREADS = 2
ROUNDS = 7
CALLS = 300  # session runs per measurement
GAP_S = 0.05
# SmolLM2-135M's matrices, as (in_features K, out_features N): q/o, k/v, gate/up, down
SHAPES = ((576, 576), (576, 192), (576, 1536), (1536, 576))
OPTIONS = ("4b32", "2b64")
ZERO_POINTS = ("uint8", "float")


def _session(k: int, n: int, option: str, zero_points: str, rng: np.random.Generator) -> Any:
    from onnx import helper

    from coalora.kernels.matmulnbits import DEFAULT_ACCURACY_LEVEL, DOMAIN
    from coalora.kernels.options import QuantOption
    from coalora.runtime.speed import _session as probe_session

    o = QuantOption.parse(option)
    blocks = o.n_blocks(k)
    arrays = {
        "b": rng.integers(0, 256, (n, blocks, o.block_size * o.bits // 8), dtype=np.uint8),
        "s": rng.uniform(1e-3, 1e-2, n * blocks).astype(np.float32),
        "z": (
            rng.integers(0, 256, n * -(-blocks * o.bits // 8), dtype=np.uint8)
            if zero_points == "uint8"
            else rng.uniform(0, 2**o.bits - 1, n * blocks).astype(np.float32)
        ),
    }
    node = helper.make_node(
        "MatMulNBits",
        ["x", "b", "s", "z"],
        ["y"],
        domain=DOMAIN,
        K=k,
        N=n,
        bits=o.bits,
        block_size=o.block_size,
        accuracy_level=DEFAULT_ACCURACY_LEVEL,
    )
    # the speed probes' session (the runtime's path; a BuiltSession keeps the arrays alive)
    return probe_session([node], arrays, k, n, THREADS)


def _timed(built: Any, feed: dict[str, np.ndarray]) -> dict[str, float]:
    t0 = time.perf_counter()
    for _ in range(CALLS):
        built.session.run(None, feed)
    return {"us": 1e6 * (time.perf_counter() - t0) / CALLS}


def run() -> dict[str, Any]:
    t_start = time.perf_counter()
    rng = np.random.default_rng(0)
    rows = []
    for option in OPTIONS:
        for k, n in SHAPES:
            sessions = {z: _session(k, n, option, z, rng) for z in ZERO_POINTS}
            feed = {"x": rng.standard_normal((1, k)).astype(np.float32)}
            runs = {z: (lambda s=s, feed=feed: _timed(s, feed)) for z, s in sessions.items()}
            for f in runs.values():  # warm-up
                f()
            res = interleaved(runs, list(ZERO_POINTS), ROUNDS, GAP_S)
            us = {z: [r["us"] for r in res[z]] for z in ZERO_POINTS}
            ratios = [f / u for f, u in zip(us["float"], us["uint8"], strict=True)]
            rows.append(
                {
                    "option": option,
                    "K": k,
                    "N": n,
                    "uint8_us": median(us["uint8"]),
                    "float_us": median(us["float"]),
                    "float_over_uint8": median(ratios),
                    "rounds_us": us,
                }
            )
    try:
        _session(576, 576, "8b32", "float", rng)
        eight_bit = "accepted"
    except Exception as exc:  # onnxruntime refuses the session: say what it says
        said = str(exc).strip()
        eight_bit = (
            said[said.find("MatMulNBits on CPU") :] if "MatMulNBits on CPU" in said else said
        )
        eight_bit = eight_bit.splitlines()[0][:200]
    return {
        "rows": rows,
        "eight_bit": eight_bit,
        "threads": THREADS,
        "rounds": ROUNDS,
        "calls_per_measurement": CALLS,
        "machine": machine(("coalora", "numpy", "onnxruntime")),
        "wall_s": time.perf_counter() - t_start,
        "command": "python -m benchmarks.zero_points",
    }


def summary(res: dict[str, Any]) -> dict[str, Any]:
    ratios = [r["float_over_uint8"] for r in res["rows"]]
    return {
        "float_over_uint8_min": min(ratios),
        "float_over_uint8_max": max(ratios),
        "eight_bit_float_zero_points": res["eight_bit"],
    }


def report(res: dict[str, Any]) -> str:
    s = summary(res)
    lines = [
        "# MatMulNBits with float zero points (a group-constant adapter folded into them)",
        "",
        *machine_md(res["machine"], res["command"], res["wall_s"]),
        "",
        f"One MatMulNBits, one row of activations, {res['threads']} threads, the runtime's "
        f"accuracy level; {res['calls_per_measurement']} runs per measurement, "
        f"{res['rounds']} interleaved rounds (medians; the ratio is the median of per-round "
        "ratios).",
        "",
        f"**Float zero points cost {s['float_over_uint8_min']:.1f}-"
        f"{s['float_over_uint8_max']:.1f}x the uint8 ones**: they leave the fast path. For "
        f"8-bit matrices onnxruntime refuses them: {s['eight_bit_float_zero_points']}",
        "",
        "| option | K x N | uint8 zero points us | float zero points us | float / uint8 |",
        "|---|---|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['option']} | {r['K']} x {r['N']} | {r['uint8_us']:.1f} | "
            f"{r['float_us']:.1f} | {r['float_over_uint8']:.1f} |"
        )
    lines += [
        "",
        "So an adapter folded into the zero points would cost more per token than the LoRA "
        "side branch it replaces (runtime_speed.md), and it could not reach the 8-bit "
        "matrices at all; the runtime keeps uint8 zero points.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = report_only_parser(__doc__).parse_args(argv)
    res = read_result(RESULTS / f"{STEM}.json") if args.report_only else run()
    write_result(STEM, {**res, "summary": summary(res)}, report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
