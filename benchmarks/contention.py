"""Decode with the cores to itself and with one busy process beside it: spinning on and off.

Two sessions of the same configuration (``--budget``, 2 threads) differ only in whether
onnxruntime's threads spin between nodes. They decode in interleaved rounds
(``benchmarks.common.interleaved``), first on the quiet machine, then with a busy loop pinned
to CPU 0 (an app using one core of the board). The report gives the medians, the per-round
ratio off/on in each condition, and what ``--spin auto`` chose in each
(``runtime/contention.py``).

    python -m benchmarks.contention [--bundle .cache/demo/smollm2-bbc] [--rounds 4]

writes benchmarks/results/contention.md and .json; ``summary`` holds
``off_over_on_quiet``, ``off_over_on_contended`` and the ``auto`` choices.
"""

from __future__ import annotations

import contextlib
import os
import time
from typing import Any

from benchmarks.common import (
    RESULTS,
    ROOT,
    SHARED_MACHINE,
    busy_core,
    interleaved,
    machine,
    machine_md,
    median,
    read_result,
    report_only_parser,
    write_result,
)
from benchmarks.runtime_speed import CONTEXT, NEW_TOKENS, PROMPT, THREADS, _ours

STEM = "contention"
GAP_S = 0.3


def _conditions(bundle: str, budget: str, rounds: int) -> dict[str, Any]:
    from coalora.runtime.contention import choose_spin
    from coalora.runtime.engine import Runtime

    rts = {
        mode: Runtime.open(
            bundle, budget=budget, threads=THREADS, context_length=CONTEXT, spin=mode
        )
        for mode in ("on", "off")
    }
    ids = rts["on"].encode_prompt(PROMPT)
    runs = {m: (lambda rt=rt: _ours(rt, ids)) for m, rt in rts.items()}
    out: dict[str, Any] = {"bits": rts["on"].selection.entry.bits}
    for condition in ("quiet", "contended"):
        with busy_core() if condition == "contended" else contextlib.nullcontext():
            auto = choose_spin("auto")
            res = interleaved(runs, ["on", "off"], rounds, GAP_S)
        on = [r["decode_tok_s"] for r in res["on"]]
        off = [r["decode_tok_s"] for r in res["off"]]
        out[condition] = {
            "on_tok_s": on,
            "off_tok_s": off,
            "off_over_on": median([b / a for a, b in zip(on, off, strict=True)]),
            "auto_spins": auto.spin,
            "auto_reason": auto.reason,
            "load1": [r["load1"] for r in res["on"] + res["off"]],
        }
    return out


def run(bundle: str, budget: str, rounds: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    res = _conditions(bundle, budget, rounds)
    q, c = res["quiet"], res["contended"]
    return {
        "summary": {
            "off_over_on_quiet": q["off_over_on"],
            "off_over_on_contended": c["off_over_on"],
            "auto_spins_quiet": q["auto_spins"],
            "auto_spins_contended": c["auto_spins"],
            "threads": THREADS,
        },
        **res,
        "budget": budget,
        "rounds": rounds,
        "new_tokens": NEW_TOKENS,
        "bundle": os.path.relpath(bundle, ROOT) if os.path.isabs(bundle) else bundle,
        "machine": machine(("coalora", "numpy", "onnxruntime")),
        "wall_s": time.perf_counter() - t0,
    }


def report(res: dict[str, Any], command: str) -> str:
    lines = [
        "# Decode beside a busy process: onnxruntime's threads spinning or not",
        "",
        f"Bundle `{res['bundle']}` at {res['budget']} ({res['bits']:.2f} bits), "
        f"{res['summary']['threads']} threads, {res['new_tokens']} greedy tokens per round, "
        f"{res['rounds']} interleaved rounds per condition; 'contended' runs a busy loop "
        "pinned to CPU 0.",
        "",
        *machine_md(res["machine"], command, res["wall_s"], SHARED_MACHINE),
        "",
        "| condition | spinning on tok/s | spinning off tok/s | off / on (per round) | "
        "--spin auto chose |",
        "|---|---:|---:|---:|---|",
    ]
    for cond in ("quiet", "contended"):
        r = res[cond]
        lines.append(
            f"| {cond} | {median(r['on_tok_s']):.1f} | {median(r['off_tok_s']):.1f} | "
            f"{r['off_over_on']:.2f} | {r['auto_reason']} |"
        )
    return "\n".join(lines) + "\n"


def write(res: dict[str, Any], command: str) -> None:
    write_result(STEM, {**res, "command": command}, report(res, command))


def main(argv: list[str] | None = None) -> int:
    p = report_only_parser(__doc__)
    p.add_argument("--bundle", default=str(ROOT / ".cache" / "demo" / "smollm2-bbc"))
    p.add_argument("--budget", default="4.5bits")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    if args.report_only:
        res = read_result(RESULTS / f"{STEM}.json")
        write(res, res["command"])
        return 0
    if not os.path.isdir(args.bundle):
        raise SystemExit(f"error: no bundle at {args.bundle} (make demo builds one)")
    command = f"python -m benchmarks.contention --budget {args.budget} --rounds {args.rounds}"
    res = run(args.bundle, args.budget, args.rounds)
    write(res, command)
    print(report(res, command))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
