"""Each quality lever alone, and a chosen recipe, on SmolLM2 at 2.5 / 3.5 / 4.5 bits.

Every variant is CoA-LoRA trained by ``export.baselines.run_baselines`` (method ``coa-lora``)
with today's settings except its lever: the quantizer (``gptq``), configuration sampling
(``sandwich``), LoRA init from the quantization residual (``residual-init``; ``residual-theta``
also fits θ to each option's residual), KL distillation from the shipped weights (``distill``,
weight 0.5) and the bounded search (``bounded-search``, 8 configurations re-measured per
epoch), the Pareto search over the served budgets (``sweep-range``), the cheapest configuration
every step (``floor-sampler``), θ at 4x the learning rate (``theta-lr``), U = θ(c) - θ(floor)
(``theta-anchor``) and every lever at the exporter's default (``default``: the recipe ``coalora
export`` trains with, read from ``ExportOptions``, so the row follows the defaults wherever
they move). Reported: held-out perplexity at the optimal allocation of each budget, the
fine-tuning seconds (search included), the variant's whole wall time (quantization included)
and the hypervolume of the configuration set its search ended with (every configuration of it
measured on the same held-out batches; objectives bits and log perplexity, one reference point
for all rows). The scale is reduced (``SCALE``) to fit an hour on 2 cores and is written into
the results.

    python -m benchmarks.quality_ablation [--variants before,gptq,...] [--recipe gptq,sandwich]
                                          [--threads 1] [--keep] [--quick]

writes benchmarks/results/quality_ablation.md and .json (``--quick``: a few steps on a subset
to check the harness; it writes quality_ablation_quick.* instead, not a result).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

from benchmarks.baselines import EVAL_BATCHES as BASELINE_BATCHES
from benchmarks.baselines import LEVERS_BEFORE, SETTINGS, levers_of
from benchmarks.common import RESULTS, machine, machine_md, write_result
from coalora.export.options import ExportOptions

BUDGETS: tuple[float, ...] = (2.5, 3.5, 4.5)
# each lever: only the fields it changes over LEVERS_BEFORE, where every row starts whatever
# the defaults
LEVERS: dict[str, dict[str, Any]] = {
    "before": {},
    "gptq": dict(quantizer="gptq"),
    "sandwich": dict(sampler="sandwich"),
    "residual-init": dict(lora_init="residual"),
    "residual-theta": dict(lora_init="residual-theta"),
    "distill": dict(distill_weight=0.5),
    "bounded-search": dict(search_rescore=8),
    "loss-costs": dict(cost_weights="loss"),
    "sweep-range": dict(train_range="sweep"),
    "floor-sampler": dict(sampler="floor"),
    "theta-lr": dict(theta_lr_scale=4.0),
    "theta-anchor": dict(theta_anchor="floor"),
    # the chosen recipe: every lever as `coalora export train smollm2` sets it (one home:
    # export/options.py), so the row follows the defaults wherever they move
    "default": levers_of(ExportOptions.for_model("smollm2", out="unused")),
}
# reduced from benchmarks.baselines' steps and measuring batches
SCALE = dict(steps=32, steps_per_epoch=16, eval_batches=3)
EVAL_BATCHES = 6
QUICK = dict(
    steps=2,
    steps_per_epoch=1,
    limit=160,
    initial_budgets=4,
    search_candidates=16,
    eval_batches=1,
    calib_texts=4,
)
QUICK_OPTIONS = ("2b128", "4b64", "8b64")


def recipe(names: list[str]) -> dict[str, Any]:
    """LEVERS_BEFORE with the levers ``names`` on (each lever sets its own fields only)."""
    out: dict[str, Any] = dict(LEVERS_BEFORE)
    for n in names:
        out.update(LEVERS[n])
    return out


def run_variant(name: str, fields: dict[str, Any], threads: int, quick: bool) -> dict[str, Any]:
    from coalora.export.baselines import run_baselines

    values = {**SETTINGS["smollm2"], **SCALE, **fields}
    if quick:
        values.update(QUICK, options=QUICK_OPTIONS)
    opts = ExportOptions.for_model("smollm2", out="unused", threads=threads, **values)
    t0 = time.perf_counter()
    res = run_baselines(
        opts,
        BUDGETS,
        methods=("coa-lora",),
        eval_batches=1 if quick else EVAL_BATCHES,
        measure_final_set=True,
    )
    wall = time.perf_counter() - t0
    return {
        "variant": name,
        "fields": fields,
        "perplexity": {
            f"{b:g}": m for b, (_, m) in zip(BUDGETS, res.curves["coa-lora"], strict=True)
        },
        "bits": res.bits,
        "train_seconds": res.train_seconds["coa-lora"],
        "wall_seconds": wall,
        "final_set": [list(p) for p in res.coa_final_set],
        "eval_examples": res.eval_examples,
    }


def scale_of(quick: bool) -> dict[str, Any]:
    return {**SCALE, **(QUICK if quick else {}), "measuring_batches": 1 if quick else EVAL_BATCHES}


def kept_rows(quick: bool, rerun: set[str]) -> list[dict[str, Any]]:
    """Rows of the committed result at the same scale, less those about to be measured again:
    ``--keep`` adds variants to a long ablation without re-running the ones it has."""
    path = RESULTS / ("quality_ablation_quick.json" if quick else "quality_ablation.json")
    if not path.is_file():
        return []
    old = json.loads(path.read_text(encoding="utf-8"))
    if old.get("summary", {}).get("scale") != scale_of(quick):
        return []
    return [
        {**r, "command": r.get("command", old.get("command", ""))}
        for r in old.get("rows", [])
        if r["variant"] not in rerun
    ]


def hypervolumes(rows: list[dict[str, Any]]) -> tuple[dict[str, float], list[float] | None]:
    """Each measured row's final set's hypervolume in (bits, log perplexity), both minimised,
    against one reference point worse than every row's points: the rows compare directly."""
    from coalora.export.coa_lora.search import hypervolume_2d, reference_point

    sets = {r["variant"]: r["final_set"] for r in rows if r.get("final_set")}
    if not sets:
        return {}, None
    points = [(b, math.log(m)) for pts in sets.values() for b, m in pts]
    ref = reference_point([b for b, _ in points], [y for _, y in points])
    hv = {v: hypervolume_2d([(b, math.log(m)) for b, m in pts], ref) for v, pts in sets.items()}
    return hv, list(ref)


def write(rows: list[dict[str, Any]], wall: float, command: str, quick: bool, threads: int) -> None:
    info = machine()
    stem = "quality_ablation_quick" if quick else "quality_ablation"
    scale = scale_of(quick)
    before = next((r for r in rows if r["variant"] == "before"), None)
    summary: dict[str, Any] = {
        "scale": scale,
        "perplexity": {r["variant"]: r["perplexity"] for r in rows},
        "train_seconds": {r["variant"]: r["train_seconds"] for r in rows},
        "wall_seconds": {r["variant"]: r["wall_seconds"] for r in rows},
    }
    hv, ref = hypervolumes(rows)
    if hv:
        summary["hypervolume"] = hv
        summary["hypervolume_reference"] = ref
    if before is not None:
        summary["ratio_to_before"] = {
            r["variant"]: {b: r["perplexity"][b] / before["perplexity"][b] for b in r["perplexity"]}
            for r in rows
        }
    payload = {
        "summary": summary,
        "rows": rows,
        "command": command,
        "machine": info,
        "threads": threads,
        "wall_s": wall,
        "quick": quick,
    }
    keys = [f"{b:g}" for b in BUDGETS]
    lines = [
        "# Quality levers alone, SmolLM2 + BBC News (CoA-LoRA held-out perplexity)",
        "",
        f"Reduced scale: {json.dumps(scale)} (benchmarks.baselines runs "
        f"{SETTINGS['smollm2']['steps']} steps, {BASELINE_BATCHES['smollm2']} batches)."
        + (" QUICK RUN: checks the harness, not a result." if quick else ""),
        "",
        *machine_md(info, command, wall),
        *[
            f"- rows measured by `{c}`: "
            + ", ".join(r["variant"] for r in rows if r.get("command") == c)
            for c in dict.fromkeys(r.get("command") for r in rows)
            if c and c != command
        ],
        "",
        "| variant | "
        + " | ".join(f"{k} bits" for k in keys)
        + " | fine-tuning s | wall s | hypervolume |",
        "|---|" + "---:|" * (len(keys) + 3),
    ]
    for r in rows:
        cells = " | ".join(f"{r['perplexity'][k]:.2f}" for k in keys)
        area = f"{hv[r['variant']]:.3f}" if r["variant"] in hv else "not measured"
        lines.append(
            f"| {r['variant']} | {cells} | {r['train_seconds']:.0f} | {r['wall_seconds']:.0f} "
            f"| {area} |"
        )
    if hv:
        lines += [
            "",
            "Hypervolume: the area the row's final configuration set dominates in (bits, log "
            f"perplexity), up to the reference point ({ref[0]:.2f} bits, log perplexity "
            f"{ref[1]:.2f}), every set measured on the same held-out batches. Larger is better; "
            "rows measured before it was recorded have none.",
        ]
    notes = [f"- {r['variant']}: {r['note']}" for r in rows if r.get("note")]
    if notes:
        lines += ["", "Notes:", "", *notes]
    write_result(stem, payload, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", default=",".join(LEVERS), help="comma-separated levers")
    p.add_argument("--recipe", default="", help="levers combined into one more variant")
    p.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    p.add_argument("--keep", action="store_true", help="keep the committed rows of other variants")
    p.add_argument("--quick", action="store_true", help="a few steps: checks the harness")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    combined = [v.strip() for v in args.recipe.split(",") if v.strip()]
    bad = [v for v in variants + combined if v not in LEVERS]
    if bad or args.threads < 1:
        print(f"error: variants must be some of {', '.join(LEVERS)}", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    todo = [(v, recipe([v])) for v in variants]
    if combined:
        todo.append(("recipe: " + "+".join(combined), recipe(combined)))
    t0 = time.perf_counter()
    rows = kept_rows(args.quick, {n for n, _ in todo}) if args.keep else []
    wall0 = sum(r["wall_seconds"] for r in rows)
    command = ("python -m benchmarks.quality_ablation " + " ".join(argv or sys.argv[1:])).strip()
    for name, fields in todo:
        print(f"[quality_ablation] {name}", file=sys.stderr, flush=True)
        rows.append({**run_variant(name, fields, args.threads, args.quick), "command": command})
        rows.sort(key=lambda r: list(LEVERS).index(r["variant"]) if r["variant"] in LEVERS else 99)
        # written after every variant, so a long run that stops keeps what it measured
        write(rows, wall0 + time.perf_counter() - t0, command, args.quick, args.threads)
    print(f"[quality_ablation] done in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
