"""Optimal bit allocation (MILP) vs uniform configurations of equal bits, on the real models.

For MiniLM and SmolLM2: the search quantizer's calibration-weighted cost of every (matrix,
option), then the exact allocation (scipy.optimize.milp / HiGHS) at exactly each uniform
option's bits per weight, and along a curve of budgets from the cheapest to the dearest
configuration. The allocation must never be worse than the uniform configuration it is
compared with, since that configuration is itself feasible at its own bits.

    python -m benchmarks.allocation

writes benchmarks/results/allocation.md, .json and .png.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import (
    RESULTS,
    machine,
    machine_md,
    read_result,
    report_only_parser,
    with_summary,
)
from benchmarks.quantizer_error import (
    CALIB_TEXTS,
    MAX_LENGTH,
    MODELS,
    SMOLLM2_NOTE,
    calibrate,
    q4_1_integer_zero_fraction,
)

CURVE_STEP = 0.1  # bits per weight between budgets on the curve


def run_model(name: str) -> dict[str, Any]:
    from coalora.export.allocation import (
        allocate,
        allocation_curve,
        budget_limit,
        configuration_cost,
        cost_table,
        option_histogram,
    )

    cal = calibrate(name)
    space = cal.space
    t0 = time.perf_counter()
    costs = cost_table(cal.weights, cal.moments, space.options, method="search")
    t1 = time.perf_counter()
    uniform = []
    for opt in space.options:
        cfg_u = space.uniform(opt)
        bits_u = space.bits(cfg_u)
        err_u = configuration_cost(space, costs, cfg_u)
        cfg = allocate(space, costs, bits_u)
        err = configuration_cost(space, costs, cfg)
        uniform.append(
            {
                "option": opt.name,
                "budget": bits_u,
                "uniform_error": err_u,
                "allocation_bits": space.bits(cfg),
                "allocation_error": err,
                "ratio": err / err_u if err_u > 0 else 1.0,
                "within_budget": 8 * space.nbytes(cfg) <= budget_limit(space, bits_u),
                "not_worse": err <= err_u * (1 + 1e-9),
                "histogram": option_histogram(cfg),
            }
        )
    t2 = time.perf_counter()
    lo = math.ceil(space.min_bits() / CURVE_STEP) * CURVE_STEP
    budgets = [float(b) for b in np.round(np.arange(lo, space.max_bits() + 1e-9, CURVE_STEP), 4)]
    curve = [
        {
            "budget": b,
            "bits": space.bits(cfg),
            "error": err,
            "histogram": option_histogram(cfg),
        }
        for b, cfg, err in allocation_curve(space, costs, budgets)
    ]
    t3 = time.perf_counter()
    return {
        "model": name,
        "source": cal.source,
        "matrices": len(space),
        "quantized_params": space.total_params,
        "uniform_vs_allocation": uniform,
        "curve": curve,
        "seconds": {
            **cal.seconds,
            "search_costs": t1 - t0,
            "milp_at_uniform_bits": t2 - t1,
            "milp_curve": t3 - t2,
            "milp_solves": len(uniform) + len(curve),
        },
    }


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.8), squeeze=False)
    for ax, res in zip(axes[0], results, strict=True):
        xs = [p["bits"] for p in res["curve"]]
        ys = [p["error"] for p in res["curve"]]
        ax.plot(xs, ys, "-", color="tab:blue", label="MILP allocation (per-matrix options)")
        for u in res["uniform_vs_allocation"]:
            ax.plot(u["budget"], u["uniform_error"], "o", color="tab:red")
            ax.annotate(
                u["option"],
                (u["budget"], u["uniform_error"]),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
        ax.plot([], [], "o", color="tab:red", label="uniform option")
        ax.set_yscale("log")
        ax.set_xlabel("bits per weight (codes + fp32 scales + zero points)")
        ax.set_ylabel("weighted error  sum E[x_k^2] ||dW_k||^2")
        title = f"{res['model']} ({res['matrices']} matrices)"
        if res["model"] == "smollm2":
            title += "\nweights were Q4_1 (4-bit, block 32) in the GGUF"
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def summary(payload: dict[str, Any]) -> dict[str, Any]:
    """Per model: the MILP allocation's output error over the uniform option's at the same
    bits (median and worst), and whether every allocation kept its budget and was no worse."""
    out: dict[str, Any] = {}
    for r in payload["results"]:
        rows = r["uniform_vs_allocation"]
        ratios = [row["ratio"] for row in rows]
        out[r["model"]] = {
            "allocations": len(rows),
            "median_error_ratio": float(np.median(ratios)),
            "worst_error_ratio": max(ratios),
            "all_within_budget": all(row["within_budget"] for row in rows),
            "all_not_worse": all(row["not_worse"] for row in rows),
        }
    return out


def write_md(payload: dict[str, Any], out: Path = RESULTS / "allocation.md") -> None:
    """The report, from the JSON payload alone (``--report-only`` passes the committed one)."""
    results, info, command = payload["results"], payload["machine"], payload["command"]
    wall, q4_1_fraction = payload["wall_s"], payload["q4_1_blocks_with_integer_zero"]
    lines = [
        "# Bit allocation: exact MILP vs uniform options at equal bits",
        "",
        "Cost of matrix i under option o: `sum_k E[x_k^2] * ||W_i[:,k] - Q_o(W_i)[:,k]||^2`",
        "with the search quantizer (importance-weighted); E[x_k^2] from "
        f"{CALIB_TEXTS} BBC News articles, first {MAX_LENGTH} tokens each.",
        "Allocation: one option per matrix minimising the summed cost with total bits (codes +",
        "fp32 scales + packed zero points, exact integers) <= budget x quantized weights;",
        "`scipy.optimize.milp` (HiGHS) with a zero optimality gap. Each uniform option is",
        "compared at exactly its own bits per weight. Plot: `allocation.png`.",
        "",
        *machine_md(info, command, wall),
        "",
    ]
    for res in results:
        lines += [
            f"## {res['model']} ({res['matrices']} matrices, "
            f"{res['quantized_params']:,} quantized weights)",
            "",
        ]
        if res["model"] == "smollm2":
            lines += [
                f"> {SMOLLM2_NOTE}",
                ">",
                f"> Measured: {100 * q4_1_fraction:.1f}% of the GGUF's Q4_1 blocks have "
                "-min/scale within 0.02 of an integer (4% would be chance).",
                "",
            ]
        lines += [
            "| uniform option | bits/weight | uniform error | allocation bits | allocation error "
            "| allocation / uniform | allocation's options |",
            "|---|---:|---:|---:|---:|---:|---|",
        ]
        for u in sorted(res["uniform_vs_allocation"], key=lambda r: r["budget"]):
            hist = ", ".join(f"{k}x{v}" for k, v in u["histogram"].items())
            flag = "" if u["within_budget"] and u["not_worse"] else " **FAIL**"
            lines.append(
                f"| {u['option']} | {u['budget']:.4f} | {u['uniform_error']:.4g} | "
                f"{u['allocation_bits']:.4f} | {u['allocation_error']:.4g} | "
                f"{u['ratio']:.3f}{flag} | {hist} |"
            )
        ok = all(u["within_budget"] and u["not_worse"] for u in res["uniform_vs_allocation"])
        sec = res["seconds"]
        marks = [p for p in res["curve"] if abs(p["budget"] * 2 - round(p["budget"] * 2)) < 1e-9]
        lines += [
            "",
            f"Allocation within budget and <= uniform at every uniform option: "
            f"{'yes' if ok else 'NO'}.",
            "",
            f"Curve (every 0.5 bits; the JSON holds every {CURVE_STEP} bits):",
            "",
            "| budget | bits | weighted error | options |",
            "|---:|---:|---:|---|",
        ]
        for p in marks:
            hist = ", ".join(f"{k}x{v}" for k, v in p["histogram"].items())
            lines.append(f"| {p['budget']:.2f} | {p['bits']:.4f} | {p['error']:.4g} | {hist} |")
        lines += [
            "",
            f"Times: load {sec['load']:.0f} s, calibration {sec['calibration']:.0f} s, "
            f"cost table {sec['search_costs']:.0f} s, {sec['milp_solves']} MILP solves "
            f"{sec['milp_at_uniform_bits'] + sec['milp_curve']:.1f} s.",
            "",
        ]
    out.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    args = report_only_parser(__doc__).parse_args(argv)
    if args.report_only:
        p = read_result(RESULTS / "allocation.json")
        plot(p["results"], RESULTS / "allocation.png")
        write_md(p)
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    results = []
    for name in MODELS:
        print(f"[allocation] {name}", file=sys.stderr, flush=True)
        results.append(run_model(name))
    wall = time.perf_counter() - start
    info = machine()
    command = "python -m benchmarks.allocation"
    q4_1_fraction = q4_1_integer_zero_fraction()
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "command": command,
        "machine": info,
        "wall_s": wall,
        "calibration": {"texts": CALIB_TEXTS, "max_length": MAX_LENGTH, "corpus": "BBC News"},
        "results": results,
        "notes": {"smollm2": SMOLLM2_NOTE},
        "q4_1_blocks_with_integer_zero": q4_1_fraction,
    }
    payload = with_summary(payload, summary(payload))
    (RESULTS / "allocation.json").write_text(json.dumps(payload, indent=2))
    plot(results, RESULTS / "allocation.png")
    write_md(payload)
    bad = [
        (r["model"], u["option"])
        for r in results
        for u in r["uniform_vs_allocation"]
        if not (u["within_budget"] and u["not_worse"])
    ]
    print(f"[allocation] wrote {RESULTS / 'allocation.md'} in {wall:.0f} s")
    if bad:
        print(
            f"[allocation] allocation worse than uniform or over budget at {bad}", file=sys.stderr
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
