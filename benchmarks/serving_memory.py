"""Resident memory over a long serving session, against the memory plan.

A runtime that serves for hours must stay inside its plan, not only right after opening.
Each budget runs in a fresh process that imports only the runtime: it opens the bundle, then
serves sampled chat requests (a fixed list of prompts, one seed each) until ``--tokens`` new
tokens, and reads after every request its RSS, the part of it that is the bundle's mapped
base file (``/proc/self/smaps``) and its peak (VmHWM). A tied model's embedding is gathered
from the LM head's codes: how much of that table a long session pulls back into the process
is what this measures.

``--label`` names the run (e.g. the commit measured); ``--keep`` adds its rows to the
committed ones, so two versions of the runtime can be compared with the same command.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS,
    child_json,
    machine,
    proc_status,
    read_result,
    report_only_parser,
    write_result,
)

STEM = "serving_memory"
DEFAULT_BUNDLE = ".cache/demo/smollm2-bbc"
PROMPTS = (
    "Write a long story about a dragon who learns to cook.",
    "List the countries of Europe with their capitals and languages.",
    "Explain in detail how a computer runs a program.",
    "Write Python code that reads a CSV file and sorts it by date.",
    "Describe the history of the Roman empire, century by century.",
    "What are the main causes of inflation? Give examples from several countries.",
)
MB = 1e6


def mapped_base_bytes() -> int:
    """Resident bytes of this process's mappings of a bundle's base file (``/proc/self/smaps``)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as fh:
        for line in fh:
            if line[0] in "0123456789abcdef" and "-" in line.split()[0]:
                inside = line.rstrip().endswith("/base.safetensors")
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1]) * 1024
    return total


def child(bundle: str, budget: str, tokens: int, max_new: int) -> dict[str, Any]:
    """In a fresh process that imports only the runtime: open, then serve sampled requests
    until ``tokens`` new tokens, reading the memory after each."""
    from coalora.runtime.engine import Runtime
    from coalora.runtime.sampling import SamplingParams

    rt = Runtime.open(bundle, budget=budget, threads=2, context_length=512)
    plan = rt.plan(rt.config)
    rows = [{"tokens": 0, **proc_status(), "mapped_base": mapped_base_bytes()}]
    served, i = 0, 0
    while served < tokens:
        sampling = SamplingParams(temperature=1.0, seed=i)
        for _ in rt.stream(PROMPTS[i % len(PROMPTS)], max_new_tokens=max_new, sampling=sampling):
            pass
        served += rt.last_stats.new_tokens
        i += 1
        rows.append({"tokens": served, **proc_status(), "mapped_base": mapped_base_bytes()})
    return {
        "bits": rt.selection.entry.bits,
        "plan_total": plan.total,
        "plan_other_weights": plan.other_weights_bytes,
        "requests": i,
        "rows": rows,
    }


def measure(bundle: str, budget: str, tokens: int, max_new: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    args = (str(Path(bundle).resolve()), budget, str(tokens), str(max_new))
    res = child_json("benchmarks.serving_memory", *args, what=f"the serving child at {budget}")
    res.update(budget=budget, wall_s=time.perf_counter() - t0)
    return res


def row_summary(run: dict[str, Any]) -> dict[str, Any]:
    rows = run["rows"]
    first, last = rows[1], rows[-1]
    return {
        "bits": round(run["bits"], 2),
        "tokens": last["tokens"],
        "plan_other_weights_mb": round(run["plan_other_weights"] / MB, 1),
        "plan_mb": round(run["plan_total"] / MB, 1),
        "peak_mb": round(max(r["VmHWM"] for r in rows) / MB, 1),
        "peak_over_plan": round(max(r["VmHWM"] for r in rows) / run["plan_total"], 3),
        "rss_growth_mb": round((last["VmRSS"] - first["VmRSS"]) / MB, 1),
        "mapped_base_end_mb": round(last["mapped_base"] / MB, 1),
    }


def summary(res: dict[str, Any]) -> dict[str, Any]:
    return {
        label: {run["budget"]: row_summary(run) for run in entry["budgets"]}
        for label, entry in res["runs"].items()
    }


def render(res: dict[str, Any]) -> str:
    s = res["summary"]
    lines = [
        "# Resident memory over a long serving session",
        "",
        f"Machine: {res['machine']['cpu']}, {res['machine']['cores']} cores, "
        f"{res['machine'].get('ram_gb', '?')} GB.",
        "",
        "Each row: a fresh process opens the bundle at the budget (2 threads, context 512) "
        f"and serves sampled chat requests (temperature 1, {len(PROMPTS)} prompts in turn, one "
        "seed each, up to the run's new tokens per request) until the run's total of new "
        "tokens. RSS growth is from after the first request to the end; 'mapped base' is the "
        "resident part of the bundle's mapped base file (the LM head's codes, norms) at the "
        "end; peak is VmHWM over the whole run, open included.",
        "",
        "| run | budget | bits | tokens | plan other weights MB | plan MB | peak MB | "
        "peak / plan | RSS growth MB | mapped base MB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, rows in s.items():
        for budget, r in rows.items():
            lines.append(
                f"| {label} | {budget} | {r['bits']:.2f} | {r['tokens']} | "
                f"{r['plan_other_weights_mb']:.1f} | {r['plan_mb']:.1f} | {r['peak_mb']:.1f} | "
                f"{r['peak_over_plan']:.2f} | {r['rss_growth_mb']:.1f} | "
                f"{r['mapped_base_end_mb']:.1f} |"
            )
    lines += ["", "Runs:", ""]
    lines += [
        f"- {label}: bundle `{e['bundle']}`, {e['tokens']} tokens, at most "
        f"{e['max_new_tokens']} per request; `{e['command']}`"
        for label, e in res["runs"].items()
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--child"]:
        bundle, budget, tokens, max_new = args_in[1:5]
        print(json.dumps(child(bundle, budget, int(tokens), int(max_new))))
        return 0
    p = report_only_parser(__doc__)
    p.add_argument("--bundle", default=DEFAULT_BUNDLE)
    p.add_argument("--budgets", default="3.5bits,4.5bits")
    p.add_argument("--tokens", type=int, default=2000, help="new tokens served per budget")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--label", default="this version", help="the run's name in the report")
    p.add_argument("--keep", action="store_true", help="add to the committed runs")
    args = p.parse_args(argv)
    path = RESULTS / f"{STEM}.json"
    if args.report_only:
        res = read_result(path)
        write_result(STEM, res, render(res))
        return 0
    if not Path(args.bundle).is_dir():
        raise SystemExit(f"error: no bundle at {args.bundle}: run `make demo` first")
    runs = [
        measure(args.bundle, b.strip(), args.tokens, args.max_new_tokens)
        for b in args.budgets.split(",")
    ]
    res = read_result(path) if args.keep and path.is_file() else {"runs": {}}
    res["machine"] = machine(("coalora", "numpy", "onnxruntime"))
    res["runs"][args.label] = {
        "bundle": args.bundle,
        "tokens": args.tokens,
        "max_new_tokens": args.max_new_tokens,
        "command": "python -m benchmarks.serving_memory "
        + shlex.join(sys.argv[1:] if argv is None else argv),
        "budgets": runs,
    }
    res["summary"] = summary(res)
    text = render(res)
    write_result(STEM, res, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
