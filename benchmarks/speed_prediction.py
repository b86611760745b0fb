"""The compute budget's prediction against measured decoding, on a real bundle.

Five stored configurations spread over the bundle's bits are opened side by side; each
decodes ``NEW_TOKENS`` greedy tokens after the speed benchmark's prompt, in interleaved rounds
(``benchmarks.common.interleaved``), measured as ``benchmarks.runtime_speed`` measures it.
The prediction is ``runtime/speed.py``'s, from costs measured afresh in the same process
(not the cache), at the mean position of the decode. The exact path (``--exact``) of the
middle configuration runs in the same rounds, for its speed against the fast path.

    python -m benchmarks.speed_prediction [--bundle .cache/demo/smollm2-bbc] [--rounds 4]

writes benchmarks/results/speed_prediction.md and .json; ``summary`` holds
``predicted_vs_measured_max_error`` (the largest |predicted - measured| / measured) and
``exact_vs_fast``.
"""

from __future__ import annotations

import os
import time
from typing import Any

from benchmarks.common import (
    RESULTS,
    ROOT,
    SHARED_MACHINE,
    interleaved,
    machine,
    machine_md,
    median,
    read_result,
    report_only_parser,
    write_result,
)
from benchmarks.runtime_speed import CONTEXT, NEW_TOKENS, PROMPT, THREADS, _ours

CONFIGURATIONS = 5
GAP_S = 0.3
STEM = "speed_prediction"


def _spread(entries: list[Any], n: int) -> list[Any]:
    by_bits = sorted(entries, key=lambda e: e.bits)
    if len(by_bits) <= n:
        return by_bits
    return [by_bits[round(i * (len(by_bits) - 1) / (n - 1))] for i in range(n)]


def predict(runtimes: dict[str, Any], position: int) -> tuple[Any, dict[str, dict[str, Any]]]:
    """The runtime's own prediction (``runtime/speed.py``) for each opened runtime at
    ``position``, from costs measured afresh here (not the cache): the costs, and per key a
    row with the uncalibrated ``predicted_tok_s`` and the work behind it."""
    from coalora.runtime.speed import decode_work, measure, options_read

    first = next(iter(runtimes.values()))
    costs = measure(options_read(first.accountant), first.threads, first.accuracy_level)
    rows = {}
    for key, rt in runtimes.items():
        work = decode_work(rt.accountant, rt.arch, rt.config, position)
        rows[key] = {
            "configuration": key,
            "bits": rt.selection.entry.bits,
            "predicted_tok_s": costs.tok_s(work),
            "nodes": work.nodes,
            "weights_read": {o.name: n for o, n in sorted(work.weights.items())},
            "fp32_values_read": work.fp32_values,
        }
    return costs, rows


def calibrate(rows: dict[str, dict[str, Any]], key: str, measured_tok_s: float) -> float:
    """Scale every prediction by one decode of ``key`` (as the runtime's first decode
    calibrates its costs): sets ``calibrated_tok_s`` on each row, returns the factor."""
    calibration = measured_tok_s / rows[key]["predicted_tok_s"]
    for row in rows.values():
        row["calibrated_tok_s"] = row["predicted_tok_s"] * calibration
    return calibration


def score(row: dict[str, Any], measured_tok_s: float) -> None:
    """|predicted - measured| / measured, calibrated (``error``) and not."""
    row["uncalibrated_error"] = abs(row["predicted_tok_s"] - measured_tok_s) / measured_tok_s
    row["error"] = abs(row["calibrated_tok_s"] - measured_tok_s) / measured_tok_s


def run(bundle: str, rounds: int) -> dict[str, Any]:
    from coalora.runtime.engine import Runtime

    t_start = time.perf_counter()
    probe = Runtime.open(
        bundle, budget="32bits", threads=THREADS, context_length=CONTEXT, build=False
    )
    entries = _spread(list(probe.pareto.entries), CONFIGURATIONS)
    runtimes = {
        f"{e.bits:.2f} bits": Runtime.open(
            bundle,
            budget=f"{e.bits + 1e-9:.9f}bits",
            threads=THREADS,
            context_length=CONTEXT,
        )
        for e in entries
    }
    # the exact path (--exact) at the middle configuration, in the same rounds
    middle = entries[len(entries) // 2]
    exact_key = f"exact, {middle.bits:.2f} bits"
    exact = Runtime.open(
        bundle,
        budget=f"{middle.bits + 1e-9:.9f}bits",
        threads=THREADS,
        context_length=CONTEXT,
        lora_bits=32,
        accuracy_level=0,
    )
    ids = next(iter(runtimes.values())).encode_prompt(PROMPT)
    position = len(ids) + NEW_TOKENS // 2
    costs, rows_by_key = predict(runtimes, position)
    # one decode of the middle configuration calibrates, as the runtime's first decode does
    # (``speed.record_decode``); it is not one of the measured rounds
    mid_key = f"{middle.bits:.2f} bits"
    calibration = calibrate(rows_by_key, mid_key, _ours(runtimes[mid_key], ids)["decode_tok_s"])
    order = list(runtimes)
    runs = {k: (lambda rt=rt: _ours(rt, ids)) for k, rt in runtimes.items()}
    runs[exact_key] = lambda: _ours(exact, ids)
    results = interleaved(runs, [*order, exact_key], rounds, GAP_S)
    exact_rounds = [r["decode_tok_s"] for r in results.pop(exact_key)]
    fast_rounds = [r["decode_tok_s"] for r in results[f"{middle.bits:.2f} bits"]]
    exact_vs_fast = median([e / f for e, f in zip(exact_rounds, fast_rounds, strict=True)])
    for key, rs in results.items():
        row = rows_by_key[key]
        row["measured_tok_s_rounds"] = [r["decode_tok_s"] for r in rs]
        row["measured_tok_s"] = median(row["measured_tok_s_rounds"])
        row["load1"] = [r["load1"] for r in rs]
        score(row, row["measured_tok_s"])
    rows = [rows_by_key[k] for k in order]
    return {
        "summary": {
            "predicted_vs_measured_max_error": max(r["error"] for r in rows),
            "uncalibrated_max_error": max(r["uncalibrated_error"] for r in rows),
            "calibration": calibration,
            "configurations": len(rows),
            "threads": THREADS,
            "exact_vs_fast": exact_vs_fast,
        },
        "exact": {
            "configuration": exact_key,
            "decode_tok_s_rounds": exact_rounds,
            "fast_decode_tok_s_rounds": fast_rounds,
            "plan_bytes": exact.selection.plan.total,
        },
        "rows": rows,
        "costs": costs.to_json(),
        "position": position,
        "new_tokens": NEW_TOKENS,
        "rounds": rounds,
        "bundle": os.path.relpath(bundle, ROOT) if os.path.isabs(bundle) else bundle,
        "machine": machine(("coalora", "numpy", "onnxruntime")),
        "wall_s": time.perf_counter() - t_start,
    }


def report(res: dict[str, Any], command: str) -> str:
    s, c = res["summary"], res["costs"]
    lines = [
        "# Predicted against measured decode speed (`--min-speed`)",
        "",
        f"Bundle `{res['bundle']}`, {s['threads']} threads, {res['new_tokens']} greedy tokens per "
        f"round, {res['rounds']} interleaved rounds (medians); predicted at position "
        f"{res['position']} from costs measured in the same run: "
        + ", ".join(f"{k} {v * 1e12:.0f} ps/weight" for k, v in c["seconds_per_weight"].items())
        + f", fp32 {c['fp32_seconds_per_value'] * 1e12:.0f} ps/value, "
        f"{c['node_seconds'] * 1e6:.1f} us/node (measured in {c['measured_s']:.1f} s).",
        "",
        *machine_md(res["machine"], command, res["wall_s"], SHARED_MACHINE),
        "",
        f"**Largest error: {100 * s['predicted_vs_measured_max_error']:.1f}%** "
        "(|predicted - measured| / measured), with the predictions calibrated by one decode of "
        f"the middle configuration (x{s['calibration']:.2f}, as the runtime's first decode "
        f"calibrates them); uncalibrated, {100 * s['uncalibrated_max_error']:.1f}%.",
        "",
        "| configuration | nodes | probes alone tok/s | calibrated tok/s | measured tok/s | "
        "error | load (1 min) |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in res["rows"]:
        load = "/".join(f"{x:.1f}" for x in r["load1"])
        lines.append(
            f"| {r['configuration']} | {r['nodes']} | {r['predicted_tok_s']:.1f} | "
            f"{r['calibrated_tok_s']:.1f} | {r['measured_tok_s']:.1f} | "
            f"{100 * r['error']:.1f}% | {load} |"
        )
    e = res["exact"]
    lines += [
        "",
        f"The exact path (`--exact`: fp32 activations, 2- and 8-bit matrices as fp32 MatMul of "
        f"their dequantized weights) at {e['configuration'].split(', ')[1]}: median "
        f"{median(e['decode_tok_s_rounds']):.1f} tok/s, **{s['exact_vs_fast']:.2f}x** the fast "
        f"path in the same rounds (per-round ratio, median); plan "
        f"{e['plan_bytes'] / 1e6:.0f} MB.",
    ]
    return "\n".join(lines) + "\n"


def write(res: dict[str, Any], command: str) -> None:
    write_result(STEM, {**res, "command": command}, report(res, command))


def main(argv: list[str] | None = None) -> int:
    p = report_only_parser(__doc__)
    p.add_argument("--bundle", default=str(ROOT / ".cache" / "demo" / "smollm2-bbc"))
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    if args.report_only:
        res = read_result(RESULTS / f"{STEM}.json")
        write(res, res["command"])
        return 0
    if not os.path.isdir(args.bundle):
        raise SystemExit(f"error: no bundle at {args.bundle} (make demo builds one)")
    command = "python -m benchmarks.speed_prediction" + (
        f" --rounds {args.rounds}" if args.rounds != 4 else ""
    )
    res = run(args.bundle, args.rounds)
    write(res, command)
    print(report(res, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
