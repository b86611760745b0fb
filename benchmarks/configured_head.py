"""A bundle whose tied embedding / LM head is a matrix of the configuration: what its Pareto
set keeps, each stored configuration's memory plan, and what byte budgets get with the head
configured against the same bundle limited to its default head.

Reads a bundle exported with ``--head-options`` (no model run and no torch: the stored
metrics were measured by the export's sweep, the plans are the runtime's own):

    coalora export train gemma3 --fast --head-options 4b64 --out .cache/demo/gemma3-heads
    python -m benchmarks.configured_head --bundle .cache/demo/gemma3-heads

writes benchmarks/results/configured_head.{md,json}.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS,
    machine,
    machine_md,
    read_result,
    report_only_parser,
    write_result,
)

STEM = "configured_head"
BUDGET_STEPS = 8  # byte budgets from the smallest plan to the largest


def measure(path: Path) -> dict[str, Any]:
    from coalora.kernels.options import QuantOption
    from coalora.runtime.budget import parse_budget
    from coalora.runtime.engine import Runtime
    from coalora.runtime.format.pareto import ParetoSet
    from coalora.runtime.format.spec import head_file
    from coalora.runtime.selection import SelectionError, select

    rt = Runtime.open(path, budget="auto", threads=1, build=False)
    b = rt.bundle
    space = b.space
    if not space.head_options:
        raise SystemExit(f"error: {path} has no configured head (export it with --head-options)")
    default = QuantOption.parse(b.lm_head)
    pareto = rt.pareto
    rows = [
        {
            "bits": e.bits,
            "head": e.config.head.name,
            "metric": e.metric,
            "nbytes": e.nbytes,
            "plan_bytes": rt.plan(e.config).total,
            "seen_in_training": e.seen_in_training,
        }
        for e in pareto.entries
    ]
    # the same body with both heads stored: what the smaller head costs in quality
    by_body: dict[Any, dict[str, float]] = {}
    for e in pareto.entries:
        by_body.setdefault(e.config.with_head(None), {})[e.config.head.name] = e.metric
    pairs = [
        {"bits": space.bits(c), **{k: v for k, v in heads.items()}}
        for c, heads in by_body.items()
        if len(heads) > 1
    ]
    only_default = ParetoSet(
        tuple(e for e in pareto.entries if e.config.head == default),
        pareto.metric_name,
        pareto.higher_is_better,
    )
    plans = [r["plan_bytes"] for r in rows]
    lo, hi = min(plans), max(plans)
    budgets = sorted({lo + (hi - lo) * i // (BUDGET_STEPS - 1) for i in range(BUDGET_STEPS)})

    def pick(p: ParetoSet, limit: int) -> dict[str, Any] | None:
        try:
            sel = select(p, parse_budget(f"{limit}B"), rt.plan, available_bytes=limit)
        except SelectionError:
            return None
        e = sel.entry
        return {"bits": e.bits, "head": e.config.head.name, "metric": e.metric}

    served = [
        {"budget_bytes": m, "configured": pick(pareto, m), "default_only": pick(only_default, m)}
        for m in budgets
    ]
    head = space.head
    assert head is not None
    out = {
        "bundle": str(path),
        "family": b.family,
        "metric_name": pareto.metric_name,
        "default_head": default.name,
        "head_shape": list(head.shape),
        "head_mb": {o.name: o.nbytes(*head.shape) / 1e6 for o in space.head_options},
        "bundle_mb": b.size_on_disk() / 1e6,
        "head_files_mb": sum(
            b.file_bytes(head_file(o)) or 0 for o in space.head_options if o != default
        )
        / 1e6,
        "entries": rows,
        "pairs": pairs,
        "served": served,
    }
    rt.close()
    return out


def summary(res: dict[str, Any]) -> dict[str, Any]:
    rows = res["entries"]
    heads = sorted({r["head"] for r in rows})
    smallest = {h: min(r["plan_bytes"] for r in rows if r["head"] == h) / 1e6 for h in heads}
    d = res["default_head"]
    ratios = [p[h] / p[d] for p in res["pairs"] for h in p if h not in ("bits", d)]
    return {
        "entries_per_head": {h: sum(r["head"] == h for r in rows) for h in heads},
        "smallest_plan_mb": smallest,
        "head_mb": res["head_mb"],
        "bundle_mb": res["bundle_mb"],
        "head_files_mb": res["head_files_mb"],
        "smaller_head_metric_ratio": [min(ratios), max(ratios)] if ratios else [],
        "budgets_served_only_with_the_configured_head": sum(
            1 for s in res["served"] if s["configured"] and not s["default_only"]
        ),
    }


def _pick(s: dict[str, Any] | None) -> str:
    if s is None:
        return "refused"
    return f"{s['bits']:.2f} bits, head {s['head']}, {s['metric']:.2f}"


def report(res: dict[str, Any]) -> str:
    s = res["summary"]
    name = res["metric_name"]
    lines = [
        f"# A configured LM head: {res['family']} ({res['bundle']})",
        "",
        f"The tied embedding / LM head ({res['head_shape'][0]:,} x {res['head_shape'][1]}) is a "
        "matrix of the configuration: the export measured every stored configuration with each "
        f"head option and kept the front over (bits, bytes, {name}). Bits are the body's "
        "average (what `--budget Nbits` means); bytes and the memory plan count the head. "
        f"Default head {res['default_head']}.",
        "",
        *machine_md(res["machine"], res["command"], res["wall_s"], None),
        "",
        f"Bundle on disk {res['bundle_mb']:.1f} MB, of which the other heads' files "
        f"{res['head_files_mb']:.1f} MB; the head is "
        + ", ".join(f"{mb:.1f} MB at {o}" for o, mb in res["head_mb"].items())
        + ".",
        "",
        "## Stored configurations",
        "",
        f"| bits | head | {name} | weights MB | plan MB | seen in training |",
        "|---:|---|---:|---:|---:|---|",
    ]
    for r in sorted(res["entries"], key=lambda r: (r["bits"], r["head"])):
        lines.append(
            f"| {r['bits']:.2f} | {r['head']} | {r['metric']:.2f} | {r['nbytes'] / 1e6:.1f} | "
            f"{r['plan_bytes'] / 1e6:.0f} | {'yes' if r['seen_in_training'] else 'no'} |"
        )
    if res["pairs"]:
        heads = [h for h in res["head_mb"] if h != res["default_head"]]
        lines += [
            "",
            "## The same body with each head",
            "",
            f"| bits | {res['default_head']} | " + " | ".join(heads) + " | ratio |",
            "|---:|---:|" + "---:|" * len(heads) + "---:|",
        ]
        for p in sorted(res["pairs"], key=lambda p: p["bits"]):
            d = p.get(res["default_head"])
            cells = " | ".join(f"{p[h]:.2f}" if h in p else "-" for h in heads)
            ratio = " / ".join(f"{p[h] / d:.3f}" for h in heads if h in p and d)
            lines.append(f"| {p['bits']:.2f} | {d:.2f} | {cells} | {ratio} |")
    lines += [
        "",
        "## What a byte budget gets",
        "",
        "The runtime's selection at each budget (the whole process's plan), with the head "
        "configured and with the same bundle limited to its default head.",
        "",
        "| budget MB | configured head | default head only |",
        "|---:|---|---|",
    ]
    for row in res["served"]:
        lines.append(
            f"| {row['budget_bytes'] / 1e6:.0f} | {_pick(row['configured'])} | "
            f"{_pick(row['default_only'])} |"
        )
    lines += [
        "",
        "Smallest plan per head: "
        + ", ".join(f"{h} {mb:.0f} MB" for h, mb in s["smallest_plan_mb"].items())
        + f"; budgets served only with the configured head: "
        f"{s['budgets_served_only_with_the_configured_head']} of {len(res['served'])}.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = report_only_parser(__doc__)
    p.add_argument("--bundle", type=Path, help="a bundle exported with --head-options")
    args = p.parse_args(argv)
    if args.report_only:
        res = read_result(RESULTS / f"{STEM}.json")
        res["summary"] = summary(res)
        write_result(STEM, res, report(res))
        return 0
    if args.bundle is None:
        print("error: --bundle is required (or --report-only)", file=sys.stderr)
        return 2
    from coalora.runtime.format.reader import BundleError

    t0 = time.perf_counter()
    try:
        res = measure(args.bundle)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    res["command"] = (
        "python -m benchmarks.configured_head " + " ".join(argv or sys.argv[1:])
    ).strip()
    res["machine"] = machine()
    res["wall_s"] = time.perf_counter() - t0
    res["summary"] = summary(res)
    write_result(STEM, res, report(res))
    print(report(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
