"""CoA-LoRA against the baselines it must beat, on the real models, at budgets 2.5 ... 6 bits.

Same harness for every method (``export.baselines.run_baselines``): same data and fixed-seed
split, calibration, quantized weights, starting configuration set and held-out batches; only
the adapter differs. Each method is evaluated at the optimal allocation (MILP) of every budget,
on held-out batches the configuration search never selected by.

- MiniLM-L6 + BBC News topic classification: accuracy on held-out articles.
- SmolLM2-135M + BBC News article text: held-out perplexity.
- Gemma 3 270M (base) + BBC News article text: held-out perplexity.

    python -m benchmarks.baselines --model minilm
    python -m benchmarks.baselines --model smollm2
    python -m benchmarks.baselines --model gemma3

writes benchmarks/results/baselines_<model>.md, .json and .png. ``--quick`` runs a few steps
on a subset (minutes; checks the harness, not a result to quote).

The settings (``SETTINGS``) are chosen so that each model's whole run (five methods, six
per-configuration fine-tunes) fits in about an hour on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS, machine, machine_md, with_summary

BUDGETS: tuple[float, ...] = (2.5, 3.0, 3.5, 4.0, 5.0, 6.0)
METHOD_LABELS = {
    "coa-lora": "CoA-LoRA (shared LoRA + θ)",
    "shared-lora": "Shared-LoRA (no θ)",
    "per-config-lora": "per-configuration LoRA",
    "no-lora": "no adapter",
    "fp": "full precision + LoRA",
}
# Every fine-tune of a model runs the same number of steps on the same batches. The adapter of
# CoA-LoRA and Shared-LoRA sees ``configs_per_step`` configurations per step; a
# per-configuration LoRA sees its one configuration.
SETTINGS: dict[str, dict[str, Any]] = {
    "minilm": dict(
        steps=200,
        batch_size=16,
        seq_len=128,
        steps_per_epoch=50,
        eval_batches=4,  # the search's held-out batches (64 articles)
        val_fraction=0.2,  # 445 held-out articles: 64 for the search, 320 to measure
        initial_budgets=16,
    ),
    "smollm2": dict(
        # 128 steps, not 64 (4 epochs either way): the run took 43 minutes, not 31, and every
        # method came out better. CoA-LoRA at 2.5 / 3 / 3.5 / 4 / 5 / 6 bits went from 64.3 /
        # 44.1 / 34.1 / 28.8 / 25.0 / 24.4 to 60.9 / 41.8 / 32.3 / 27.6 / 24.0 / 23.4, a
        # per-configuration LoRA from 56.8 / 43.6 / 35.7 / 31.0 / 31.8 / 27.4 to 50.1 / 40.8 /
        # 34.1 / 29.6 / 26.7 / 26.4: the longer run gains more for one LoRA per configuration
        # at 2.5 bits (CoA-LoRA / per-configuration 1.13 -> 1.22 there, 1.01 -> 1.02 at 3).
        # With the set over the served budgets (--train-range sweep) CoA-LoRA's 2.5 bits went
        # to 54.6 (1.09x), Shared-LoRA's to 55.5.
        steps=128,
        batch_size=4,
        seq_len=128,
        steps_per_epoch=32,
        # The search's held-out batches (1,024 tokens) and proposals: 2 x (8 re-scored + 4
        # proposed) forward passes a search, not 3 x (8 + 6). Its three searches then took
        # 156 s and CoA-LoRA's fine-tuning 0.99x three per-configuration LoRAs (1.24x before).
        eval_batches=2,
        proposals_per_epoch=4,
        val_fraction=0.1,
        initial_budgets=16,
    ),
    # A forward+backward pass costs ~2.5x SmolLM2's (6-7 s at batch 4 x 128 on 2 threads:
    # the 262k-row head), and calibration plus the 1,134-entry cost table take ~11 minutes,
    # so fewer steps fit the hour (measured with --quick).
    "gemma3": dict(
        steps=24,
        batch_size=4,
        seq_len=128,
        steps_per_epoch=8,
        eval_batches=2,  # the search's held-out batches (1,024 tokens)
        val_fraction=0.1,
        initial_budgets=12,
    ),
}
# measured on (at most) this many more batches
EVAL_BATCHES = {"minilm": 20, "smollm2": 12, "gemma3": 8}
QUICK = dict(steps=4, steps_per_epoch=2, limit=200, initial_budgets=8, search_candidates=32)


def run(
    model: str,
    quick: bool,
    threads: int | None,
    methods: tuple[str, ...] | None = None,
    levers: dict[str, Any] | None = None,
    budgets: tuple[float, ...] = BUDGETS,
    seed: int | None = None,
) -> dict[str, Any]:
    """One run of ``methods`` (default: all) at ``budgets``. ``seed`` (the split, init and
    sampling; the exporter's default when None) is recorded in the settings when given."""
    from coalora.export.baselines import METHODS, run_baselines
    from coalora.export.options import ExportOptions

    values = dict(SETTINGS[model])
    if quick:
        values.update(QUICK)
    values.update(levers or {})
    if seed is not None:
        values["seed"] = seed
    opts = ExportOptions.for_model(model, out="unused", threads=threads, **values)
    t0 = time.perf_counter()
    res = run_baselines(
        opts,
        budgets,
        methods or METHODS,
        eval_batches=EVAL_BATCHES[model] if not quick else 2,
    )
    wall = time.perf_counter() - t0
    out = res.to_dict()
    out["model"] = model
    out["settings"] = {k: v for k, v in values.items()}
    out["settings"]["options"] = list(opts.options)
    out["settings"]["configs_per_step"] = opts.configs_per_step
    out["settings"]["rank"] = opts.rank
    out["settings"]["initial_budgets"] = opts.initial_budgets
    out["settings"]["threads"] = threads
    out["settings"]["levers"] = levers_of(opts)
    out["quick"] = quick
    out["wall_seconds"] = wall
    out["train_passes"] = train_passes(out)
    out["targets"] = targets(res.to_dict())
    return out


# The quality levers as they were before the recipe (the search quantizer, uniform draws,
# B = 0, cross-entropy only, the whole set re-scored, unweighted output error in the allocator,
# training over the space's whole bit range):
# what a result with no recorded levers trained with, and where every row of the quality
# ablation starts.
LEVERS_BEFORE: dict[str, Any] = dict(
    quantizer="search",
    sampler="uniform",
    lora_init="zero",
    distill_weight=0.0,
    search_rescore=0,
    cost_weights="output",
    train_range="space",
    theta_lr_scale=1.0,
    theta_anchor="none",
    low_bit_rank=0,
)


def parse_pairs(flag: str, defaults: dict[str, Any], pairs: list[str]) -> dict[str, Any]:
    """``name=value`` pairs given to ``flag``, each name one of ``defaults`` and each value
    typed like its default."""
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or name not in defaults:
            raise ValueError(
                f"{flag} {pair!r}: expected NAME=VALUE, NAME one of {', '.join(defaults)}"
            )
        kind = type(defaults[name])
        try:
            out[name] = kind(text)
        except ValueError:
            raise ValueError(f"{flag} {pair!r}: {text!r} is not a {kind.__name__}") from None
    return out


def parse_levers(pairs: list[str]) -> dict[str, Any]:
    """``name=value`` pairs of quality levers, each value typed like the lever's default."""
    return parse_pairs("--lever", LEVERS_BEFORE, pairs)


def parse_settings(model: str, pairs: list[str]) -> dict[str, Any]:
    """``name=value`` overrides of ``SETTINGS[model]``, each value typed like the setting."""
    return parse_pairs("--setting", SETTINGS[model], pairs)


def parse_budgets(text: str | None) -> tuple[float, ...]:
    """``--budgets 2.5,4``: distinct positive bits, in the order given (empty: None given)."""
    if text is None:
        return ()
    try:
        out = tuple(float(b) for b in text.split(",") if b.strip())
    except ValueError:
        out = ()
    if not out or not all(0 < b < math.inf for b in out) or len(set(out)) != len(out):
        raise ValueError(f"--budgets {text!r}: expected distinct positive numbers of bits")
    return out


def levers_of(opts: Any) -> dict[str, Any]:
    """The quality levers a run trained with (every method takes the same)."""
    return {n: getattr(opts, n) for n in LEVERS_BEFORE}


def before_of(old: dict[str, Any]) -> dict[str, Any]:
    """The "before" figures a re-run keeps from the result it replaces: that result's own
    "before" when it has one (the first figures stay the reference), else its curves."""
    if old.get("before"):
        return old["before"]
    s = old["settings"]
    levers = s.get("levers", LEVERS_BEFORE)
    return {
        "command": old.get("command", ""),
        "note": f"{s['steps']} steps, levers " + json.dumps(levers),
        "budgets": old["budgets"],
        "metric": {m: [p[1] for p in pts] for m, pts in old["curves"].items()},
        "train_seconds": old["train_seconds"],
    }


def train_passes(res: dict[str, Any]) -> dict[str, int]:
    """Forward+backward passes over a batch per method: the machine-independent size of each
    fine-tune (a step trains min(configs per step, set size) configurations). CoA-LoRA's
    search adds forward passes on held-out batches that this leaves out (its seconds don't)."""
    steps, k = res["settings"]["steps"], res["settings"]["configs_per_step"]
    n = len(res["budgets"])
    passes = {"coa-lora": steps * k, "shared-lora": steps * k, "per-config-lora": n * steps}
    passes["no-lora"] = steps * k if res["train_seconds"].get("no-lora", 0) > 0 else 0
    passes["fp"] = steps
    return {m: v for m, v in passes.items() if m in res["train_seconds"]}


# -- the targets, computed from the curves --------------------------------------------
def targets(res: dict[str, Any]) -> dict[str, Any]:
    """Gaps of CoA-LoRA to each baseline per budget, the unseen-configuration check, times."""
    higher = res["higher_is_better"]
    curves = {m: [p[1] for p in pts] for m, pts in res["curves"].items()}
    out: dict[str, Any] = {}
    coa = curves.get("coa-lora")
    if coa is None:
        return out

    def gap(a: float, b: float) -> float:
        # accuracy: points better (+) than b; perplexity: percent better (+) than b
        return 100.0 * (a - b) if higher else 100.0 * (b - a) / b

    for m in ("per-config-lora", "shared-lora", "no-lora", "fp"):
        if m in curves:
            out[f"vs_{m}"] = [gap(a, b) for a, b in zip(coa, curves[m], strict=True)]
    if "per-config-lora" in curves:
        tol = -0.5 if higher else -3.0
        out["within_per_config"] = [g >= tol for g in out["vs_per-config-lora"]]
    # unseen configurations: CoA-LoRA at each budget's allocation against the curve through the
    # allocations it trained on (same MILP frontier), interpolated at the same bits
    seen_pts = res.get("coa_seen_allocations") or []
    flags = res.get("coa_budget_seen") or []
    if len(seen_pts) >= 2 and flags:
        xs = np.array([p[0] for p in seen_pts])
        ys = np.array([p[1] for p in seen_pts])
        rel = []
        for (b, v), seen in zip(res["curves"]["coa-lora"], flags, strict=True):
            if seen or not xs.min() <= b <= xs.max():
                continue
            ref = float(np.interp(b, xs, ys))
            rel.append({"bits": b, "metric": v, "seen_curve": ref, "better_pct": gap(v, ref)})
        out["unseen_vs_seen_curve"] = rel
    secs = res["train_seconds"]
    if "per-config-lora" in secs and "coa-lora" in secs:
        per_one = secs["per-config-lora"] / max(1, len(res["budgets"]))
        out["per_config_seconds_each"] = per_one
        out["coa_vs_3_per_config"] = secs["coa-lora"] / (3 * per_one)
    before = res.get("before")
    if before and before["budgets"] == res["budgets"]:
        # how many times lower each method's metric is than before, per budget
        out["before_over_now"] = {
            m: [b / a for a, b in zip(curves[m], before["metric"][m], strict=True)]
            for m in curves
            if m in before["metric"]
        }
    return out


# -- report ------------------------------------------------------------------------------------
def fmt(v: float, name: str) -> str:
    return f"{100 * v:.1f}" if name == "accuracy" else f"{v:.2f}"


def summary(res: dict[str, Any]) -> dict[str, Any]:
    """The metric of every method per budget, CoA-LoRA over per-configuration LoRA and over
    Shared-LoRA per budget, and the fine-tuning seconds (search included) of each method."""
    curves = {m: [p[1] for p in pts] for m, pts in res["curves"].items()}
    out: dict[str, Any] = {
        "metric_name": res["metric_name"],
        "budgets": res["budgets"],
        "metric": curves,
        "train_seconds": res["train_seconds"],
    }
    if res.get("before"):
        out["before"] = res["before"]["metric"]
    coa = curves.get("coa-lora")
    for m in ("per-config-lora", "shared-lora"):
        if coa is not None and m in curves:
            out[f"coa_over_{m}"] = [a / b for a, b in zip(coa, curves[m], strict=True)]
    return out


def write_report(res: dict[str, Any], command: str, stem: Path) -> None:
    name = res["metric_name"]
    unit = "accuracy (%)" if name == "accuracy" else "perplexity"
    t = res["targets"]
    examples = (
        "articles" if name == "accuracy" else f"sequences of {res['settings']['seq_len']} tokens"
    )
    lines = [
        f"# CoA-LoRA vs baselines: {res['model']} ({unit} on held-out BBC News)",
        "",
        *machine_md(res["machine"], command, res["wall_seconds"], res.get("machine_note")),
        f"- settings: {json.dumps(res['settings'])}",
        f"- held-out examples measured: {res['eval_examples']} ({examples}); the configuration "
        "search selected on other held-out batches",
    ]
    if res["quick"]:
        lines += ["", "**--quick run: a harness check, not a result.**"]
    header = (
        "| method | "
        + " | ".join(f"{b:g} ({x:.2f})" for b, x in zip(res["budgets"], res["bits"], strict=True))
        + " | fine-tuning s | passes |"
    )
    lines += [
        "",
        "Metric at the optimal allocation of each budget (column: budget, and the bits per "
        "weight of its allocation):",
        "",
        header,
        "|---" * (len(res["budgets"]) + 3) + "|",
    ]
    passes = res.get("train_passes", {})
    for m, pts in res["curves"].items():
        row = " | ".join(fmt(p[1], name) for p in pts)
        lines.append(
            f"| {METHOD_LABELS[m]} | {row} | {res['train_seconds'][m]:.0f} | {passes.get(m, '')} |"
        )
    before = res.get("before")
    if before:
        lines += [
            "",
            "Before ("
            + (
                f"the committed run of `{before['command']}`"
                if before["command"]
                else "the previously committed run"
            )
            + f", {before['note']}):",
            "",
            "| method | " + " | ".join(f"{b:g}" for b in before["budgets"]) + " | fine-tuning s |",
            "|---" * (len(before["budgets"]) + 2) + "|",
        ]
        for m, values in before["metric"].items():
            row = " | ".join(fmt(v, name) for v in values)
            lines.append(f"| {METHOD_LABELS[m]} | {row} | {before['train_seconds'][m]:.0f} |")
    seen = res.get("coa_budget_seen") or []
    if seen:
        lines += [
            "",
            "CoA-LoRA trained on the allocation at: "
            + (
                ", ".join(f"{b:g}" for b, s in zip(res["budgets"], seen, strict=True) if s)
                or "none of these budgets"
            )
            + ".",
        ]
    what = "accuracy points" if name == "accuracy" else "% lower perplexity"
    lines += [
        "",
        "`passes`: forward+backward passes over a training batch, the machine-independent size "
        "of each fine-tune (CoA-LoRA's search adds forward passes on held-out batches, which its "
        "seconds include).",
    ]
    epochs = res.get("coa_search_epochs") or []
    if epochs:
        total = sum(e["seconds"] for e in epochs)
        lines += [
            "",
            f"CoA-LoRA's search: {total:.0f} s of its {res['train_seconds']['coa-lora']:.0f} s "
            f"over {len(epochs)} epochs ({sum(e['evaluated'] for e in epochs)} configurations "
            f"scored on held-out batches; GP fits {sum(e['fit_seconds'] for e in epochs):.0f} s).",
        ]
    if res.get("prepare_seconds"):
        lines += [
            "",
            f"Every option's quantized weights were built before any method's clock started "
            f"({res['prepare_seconds']:.0f} s, shared by every method, like calibration and the "
            "cost table).",
        ]
    lines += ["", f"## Targets (positive = CoA-LoRA better, in {what})", ""]
    for key, label in (
        ("vs_per-config-lora", "vs per-configuration LoRA"),
        ("vs_shared-lora", "vs Shared-LoRA"),
        ("vs_no-lora", "vs no adapter"),
        ("vs_fp", "vs full precision + LoRA"),
    ):
        if key in t:
            lines.append(f"- {label}: " + ", ".join(f"{g:+.2f}" for g in t[key]))
    if "within_per_config" in t:
        ok = sum(t["within_per_config"])
        tol = "0.5 accuracy points" if name == "accuracy" else "3% perplexity"
        n = len(t["within_per_config"])
        lines.append(f"- within {tol} of per-configuration LoRA (or better): {ok}/{n} budgets")
    if t.get("unseen_vs_seen_curve"):
        rel = t["unseen_vs_seen_curve"]
        lines.append(
            "- unseen allocations against the curve through the seen ones (same frontier, "
            "interpolated at equal bits): "
            + ", ".join(f"{r['bits']:.2f} bits {r['better_pct']:+.2f}" for r in rel)
        )
    if "coa_vs_3_per_config" in t:
        lines.append(
            f"- fine-tuning time: CoA-LoRA {res['train_seconds']['coa-lora']:.0f} s (search "
            f"included) against {3 * t['per_config_seconds_each']:.0f} s for 3 "
            f"per-configuration LoRAs: ratio {t['coa_vs_3_per_config']:.2f}"
        )
    for m, ratios in t.get("before_over_now", {}).items():
        lines.append(
            f"- {METHOD_LABELS[m]}, before / now: " + ", ".join(f"{r:.2f}x" for r in ratios)
        )
    for note in res.get("notes", []):
        lines.append(f"- note: {note}")
    lines += ["", f"![metric against bits]({stem.name}.png)", ""]
    stem.with_suffix(".md").write_text("\n".join(lines), encoding="utf-8")


def plot(res: dict[str, Any], path: Path) -> None:
    """Metric against bits: every method (left) and the adapters alone, zoomed (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    name = res["metric_name"]
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.4), dpi=120)
    styles = {
        "coa-lora": "o-",
        "shared-lora": "s--",
        "per-config-lora": "^-.",
        "no-lora": "x:",
        "fp": "-",
    }
    colors = dict(zip(styles, plt.rcParams["axes.prop_cycle"].by_key()["color"], strict=False))
    for ax, zoom in zip(axes, (False, True), strict=True):
        for m, pts in res["curves"].items():
            if zoom and m == "no-lora":
                continue
            xs = [p[0] for p in pts]
            ys = [100 * p[1] if name == "accuracy" else p[1] for p in pts]
            label = f"{METHOD_LABELS[m]} ({res['train_seconds'][m]:.0f} s)"
            lw = 1.6 if m == "coa-lora" else 1.0
            ax.plot(xs, ys, styles[m], color=colors[m], label=label, lw=lw)
        ax.set_xlabel("bits per weight of the allocation")
        ax.set_ylabel("accuracy (%)" if name == "accuracy" else "held-out perplexity")
        if name == "perplexity" and not zoom:
            ax.set_yscale("log")
        ax.set_title("the adapters, zoomed" if zoom else "every method")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{res['model']}: metric against bits (fine-tuning seconds in the legend)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", choices=sorted(SETTINGS), required=True)
    p.add_argument("--quick", action="store_true", help="a few steps on a subset")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument(
        "--report-only", action="store_true", help="rewrite the .md and .png from the .json"
    )
    p.add_argument("--machine-note", help="how the machine was loaded during the run")
    p.add_argument(
        "--methods", help="comma-separated methods to run (a probe; needs --out-dir) [all]"
    )
    p.add_argument(
        "--lever",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override a quality lever for every method (a probe; needs --out-dir)",
    )
    p.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="override one of the model's settings, e.g. steps_per_epoch=0 for a frozen "
        "configuration set (a probe; needs --out-dir)",
    )
    p.add_argument("--seed", type=int, help="the split, init and draws (a probe) [the default]")
    p.add_argument(
        "--budgets",
        help="comma-separated budgets in bits (a probe; needs --out-dir) ["
        + ",".join(f"{b:g}" for b in BUDGETS)
        + "]",
    )
    args = p.parse_args(argv)
    try:
        levers = parse_levers(args.lever)
        settings = parse_settings(args.model, args.setting)
        budgets = parse_budgets(args.budgets)
    except ValueError as exc:
        p.error(str(exc))
    if args.seed is not None and args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    methods = tuple(m for m in (args.methods or "").split(",") if m) or None
    unknown = [m for m in methods or () if m not in METHOD_LABELS]
    if unknown:
        p.error(f"unknown method {unknown[0]!r}: expected some of {', '.join(METHOD_LABELS)}")
    # a probe must not replace the committed report, which is one whole run of every method
    probe = methods or levers or settings or budgets or args.seed is not None
    if probe and args.out_dir.resolve() == RESULTS.resolve():
        p.error(
            "--methods, --lever, --setting, --seed and --budgets write a probe: give --out-dir "
            "outside the results"
        )
    stem = args.out_dir / f"baselines_{args.model}"
    if args.report_only:
        res = json.loads(stem.with_suffix(".json").read_text())
        res.setdefault("train_passes", train_passes(res))
        res["targets"] = targets(res)
    else:
        old = stem.with_suffix(".json")
        res = run(
            args.model,
            args.quick,
            args.threads,
            methods,
            {**settings, **levers},
            budgets or BUDGETS,
            args.seed,
        )
        if old.is_file() and not args.quick:
            res["before"] = before_of(json.loads(old.read_text(encoding="utf-8")))
            res["targets"] = targets(res)  # with the before / now ratios
        res["machine"] = machine()
        res["command"] = "python -m benchmarks.baselines " + " ".join(
            sys.argv[1:] if argv is None else argv
        )
    if args.machine_note:
        res["machine_note"] = args.machine_note
    command = res.get("command", f"python -m benchmarks.baselines --model {args.model}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    res = with_summary(res, summary(res))
    stem.with_suffix(".json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    plot(res, stem.with_suffix(".png"))
    write_report(res, command, stem)
    print(stem.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
