"""Decode speed and peak RSS of the device runtime on a Gemma 3 270M bundle, against llama.cpp
running the package's own GGUF, in one run.

    python -m benchmarks.runtime_speed_gemma3 --bundle .cache/demo/gemma3-bbc [--rounds 4]

Speed: interleaved rounds (ours at each budget with the adapter on, then llama.cpp), 128
greedy tokens after the same plain completion prompt (EOS ignored by both), 2 threads; the
figure is the median over rounds and the per-round ratio. Memory: each engine in a fresh
process (``coalora-run`` and a llama.cpp script), its peak RSS (VmHWM) while loading and
decoding 128 tokens, against our memory plan. Sizes: the bundle's files against the GGUF's.
The plumbing (timed decode loops, bandwidth, bytes per token) is benchmarks/runtime_speed.py's.

Writes benchmarks/results/runtime_speed_gemma3.md and .json.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from benchmarks.anchors import llama_cpp_engine
from benchmarks.common import interleaved, machine, machine_md, median, run_measured, write_result
from benchmarks.runtime_speed import CONTEXT, NEW_TOKENS, THREADS, _ours, bandwidth
from benchmarks.runtime_speed import bytes_per_token as read_per_token

PROMPT = "The history of the city of London begins"
BUDGETS = ("3.5bits", "4.5bits", "6bits", "8bits")
REFERENCE = "4.5bits"
GAP_S = 0.3
LLAMA_CHILD = """
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_threads={threads}, n_ctx={ctx}, verbose=False)
ids = llm.tokenize(sys.argv[2].encode(), add_bos=True)
gen = llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)
for n, _ in enumerate(gen, 1):
    if n == {tokens}:
        break
"""


def _mb(n: float) -> float:
    return round(n / 1e6, 1)


def _peak_rss(bundle: Path, gguf: Path) -> dict[str, Any]:
    """Peak RSS of each engine loading and decoding 128 tokens in a fresh process."""
    run_bin = Path(sys.executable).with_name("coalora-run")
    out: dict[str, Any] = {}
    for budget in BUDGETS:
        cmd = [str(run_bin), str(bundle), "--budget", budget, "--no-chat", "--prompt", PROMPT]
        cmd += ["--max-tokens", str(NEW_TOKENS), "--threads", str(THREADS)]
        cmd += ["--context", str(CONTEXT)]
        rc, _, err, peak = run_measured(cmd)
        if rc != 0:
            raise SystemExit(f"coalora-run failed at {budget}: {err.strip()[-400:]}")
        out[budget] = peak
    script = LLAMA_CHILD.format(threads=THREADS, ctx=CONTEXT, tokens=NEW_TOKENS)
    rc, _, err, peak = run_measured([sys.executable, "-c", script, str(gguf), PROMPT])
    if rc != 0:
        raise SystemExit(f"llama.cpp failed: {err.strip()[-400:]}")
    out["llama.cpp"] = peak
    return out


def run(bundle: Path, rounds: int) -> dict[str, Any]:

    from coalora.export.models import _resolve
    from coalora.runtime.engine import Runtime

    gguf = _resolve("gemma3")
    info = machine(("numpy", "onnxruntime", "llama_cpp_python"))
    load_before = os.getloadavg()
    peaks = _peak_rss(bundle, gguf)
    runtimes = {
        b: Runtime.open(bundle, budget=b, threads=THREADS, context_length=CONTEXT) for b in BUDGETS
    }
    ids = runtimes[REFERENCE].encode_prompt(PROMPT, chat=False)
    llm = llama_cpp_engine(gguf, THREADS, CONTEXT, NEW_TOKENS)
    llama_ids = llm.llm.tokenize(PROMPT.encode(), add_bos=True)
    engines = {b: (lambda b=b: _ours(runtimes[b], ids)) for b in BUDGETS}
    engines["llama.cpp"] = lambda: llm(llama_ids)
    for once in engines.values():  # warm-up
        once()
    order = [REFERENCE, "llama.cpp", *(b for b in BUDGETS if b != REFERENCE)]
    ratios: list[float] = []

    def after_round(r: int, runs: dict[str, list[dict[str, float]]]) -> None:
        ratios.append(runs[REFERENCE][-1]["decode_tok_s"] / runs["llama.cpp"][-1]["decode_tok_s"])
        cells = ", ".join(f"{k} {runs[k][-1]['decode_tok_s']:.1f}" for k in order)
        print(f"round {r + 1}/{rounds}: {cells} tok/s", file=sys.stderr)

    runs = interleaved(engines, order, rounds, GAP_S, after_round)
    bw = bandwidth()
    mean_pos = len(ids) + NEW_TOKENS // 2
    rows = {}
    for b, rt in runtimes.items():
        dec = median([x["decode_tok_s"] for x in runs[b]])
        read = read_per_token(rt, mean_pos)["total"]
        rows[b] = {
            "bits": rt.selection.entry.bits,
            "perplexity": rt.selection.entry.metric,
            "decode_tok_s_median": dec,
            "ttft_ms_median": median([x["ttft_ms"] for x in runs[b]]),
            "peak_rss_bytes": peaks[b],
            "plan_bytes": rt.selection.plan.total,
            "peak_over_plan": peaks[b] / rt.selection.plan.total,
            "bytes_read_per_token": read,
            "bound_fraction": dec * read / (bw["read_gb_s"] * 1e9),
        }
    bundle_bytes = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    return {
        "bundle": str(bundle),
        "gguf": gguf.name,
        "prompt": PROMPT,
        "new_tokens": NEW_TOKENS,
        "threads": THREADS,
        "rounds": rounds,
        "machine": info,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "bandwidth": bw,
        "budgets": rows,
        "llama_cpp": {
            "decode_tok_s_median": median([x["decode_tok_s"] for x in runs["llama.cpp"]]),
            "ttft_ms_median": median([x["ttft_ms"] for x in runs["llama.cpp"]]),
            "peak_rss_bytes": peaks["llama.cpp"],
        },
        "ratio_per_round": ratios,
        "bundle_bytes": bundle_bytes,
        "gguf_bytes": gguf.stat().st_size,
        "runs": runs,
    }


def summary(res: dict[str, Any]) -> dict[str, Any]:
    ref = res["budgets"][REFERENCE]
    return {
        "ratio_vs_llama_cpp": median(res["ratio_per_round"]),
        "decode_tok_s": {b: r["decode_tok_s_median"] for b, r in res["budgets"].items()},
        "llama_cpp_decode_tok_s": res["llama_cpp"]["decode_tok_s_median"],
        "peak_rss_mb": {b: _mb(r["peak_rss_bytes"]) for b, r in res["budgets"].items()},
        "llama_cpp_peak_rss_mb": _mb(res["llama_cpp"]["peak_rss_bytes"]),
        "peak_over_plan": {b: r["peak_over_plan"] for b, r in res["budgets"].items()},
        "bound_fraction": ref["bound_fraction"],
        "bundle_mb": _mb(res["bundle_bytes"]),
        "gguf_mb": _mb(res["gguf_bytes"]),
    }


def markdown(res: dict[str, Any], command: str, wall: float) -> str:
    s = summary(res)
    lc = res["llama_cpp"]
    lines = [
        "# Gemma 3 270M: device runtime vs llama.cpp on the package's GGUF",
        "",
        *machine_md(res["machine"], command, wall),
        f"- bundle: `{res['bundle']}`; llama.cpp: `{res['gguf']}` (the package's Q4_K_M mix)",
        f"- {res['new_tokens']} greedy tokens after {res['prompt']!r} (no chat template, EOS "
        f"ignored), {res['threads']} threads, {res['rounds']} interleaved rounds; load "
        f"{res['load_before'][0]:.1f} before, {res['load_after'][0]:.1f} after",
        f"- decode ratio ours at {REFERENCE} / llama.cpp, median of per-round ratios: "
        f"**{s['ratio_vs_llama_cpp']:.2f}** "
        f"({', '.join(f'{x:.2f}' for x in res['ratio_per_round'])})",
        f"- sizes: bundle {s['bundle_mb']} MB (every stored option), GGUF {s['gguf_mb']} MB",
        "",
        "| engine | bits | decode tok/s | TTFT ms | peak RSS MB | plan MB | peak / plan | "
        "% of bandwidth bound |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b, r in res["budgets"].items():
        lines.append(
            f"| ours {b} | {r['bits']:.2f} | {r['decode_tok_s_median']:.1f} | "
            f"{r['ttft_ms_median']:.0f} | {_mb(r['peak_rss_bytes'])} | {_mb(r['plan_bytes'])} "
            f"| {r['peak_over_plan']:.2f} | {100 * r['bound_fraction']:.0f}% |"
        )
    lines.append(
        f"| llama.cpp | Q4_K_M | {lc['decode_tok_s_median']:.1f} | {lc['ttft_ms_median']:.0f} "
        f"| {_mb(lc['peak_rss_bytes'])} | | | |"
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import time

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bundle", type=Path, default=Path(".cache/demo/gemma3-bbc"))
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args(argv)
    if not (args.bundle / "manifest.json").is_file() or args.rounds < 1:
        print(f"error: no bundle at {args.bundle} (make demo-gemma3 builds it)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    res = run(args.bundle, args.rounds)
    res["summary"] = summary(res)
    command = "python -m benchmarks.runtime_speed_gemma3 " + " ".join(argv or sys.argv[1:])
    write_result(
        "runtime_speed_gemma3", res, markdown(res, command.strip(), time.perf_counter() - t0)
    )
    print(markdown(res, command.strip(), time.perf_counter() - t0))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
