"""Decode speed against model size: random-weight bundles with real LLaMA / Qwen shapes at
about 0.5B, 1.5B and 3B parameters, against llama.cpp on GGUFs of the same shapes and bits.

Decode speed, prefill time and memory do not depend on the weight values, only on shapes and
bits, so random weights stand for trained ones here (the text they write is meaningless).
Per size:

- ours: a bundle of the shapes with every matrix at 4b64 (4.56 bits per weight), the tied LM
  head at 8b32 and a rank-16 LoRA on every matrix (``tests/bundles.random_llama_bundle``);
- llama.cpp: a GGUF of the same shapes with Q4_0 matrices (4.5 bits per weight) and a Q8_0
  tied embedding (``benchmarks.anchors.random_llama_gguf``);
- interleaved rounds of 128 greedy tokens after a short prompt (decode tok/s), and of a
  512-token prompt (time to first token), 2 threads each;
- peak RSS of each engine in a fresh process (load and decode 128 tokens), ours against its
  memory plan; the share of the bandwidth bound (bytes read per token over numpy's read
  bandwidth).

    python -m benchmarks.scaling [--sizes 0.5b,1.5b,3b] [--rounds 3]

writes benchmarks/results/scaling.{md,json,png}; the random bundles and GGUFs are built once
under .cache/bench (about 1.6 + 2 GB at 3B).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks import anchors
from benchmarks.common import (
    RESULTS,
    ROOT,
    SHARED_MACHINE,
    interleaved,
    machine,
    machine_md,
    median,
    run_measured,
    write_result,
)
from benchmarks.runtime_speed import (
    NEW_TOKENS,
    PREFILL_TOKENS,
    PROMPT,
    THREADS,
    _ours,
    bandwidth,
    bytes_per_token,
    gguf_path,
    prefill_prompt,
)

STEM = "scaling"
CONTEXT = 1024  # room for the 512-token prompt
OPTION, GGUF_TYPE = "4b64", "Q4_0"
BUDGET = "8bits"  # the bundle stores one configuration (every matrix at OPTION): this picks it
GAP_S = 0.3
# Hugging Face configs (LLaMA blocks; the Qwen shapes without their q/k/v biases)
_COMMON = dict(
    model_type="llama",
    architectures=["LlamaForCausalLM"],
    hidden_act="silu",
    tie_word_embeddings=True,
    attention_bias=False,
    mlp_bias=False,
    max_position_embeddings=4096,
    bos_token_id=1,
    eos_token_id=2,
)
SHAPES: dict[str, dict[str, Any]] = {
    # Qwen2.5-0.5B
    "0.5b": dict(
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        vocab_size=151936,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    ),
    # Qwen2.5-1.5B
    "1.5b": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_hidden_layers=28,
        num_attention_heads=12,
        num_key_value_heads=2,
        vocab_size=151936,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
    ),
    # Llama-3.2-3B (its RoPE without the llama3 frequency scaling: the same cost)
    "3b": dict(
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=28,
        num_attention_heads=24,
        num_key_value_heads=8,
        vocab_size=128256,
        rope_theta=5e5,
        rms_norm_eps=1e-5,
    ),
}
OURS_CHILD = """
import sys
from benchmarks.runtime_speed import NEW_TOKENS, PROMPT, _ours
from coalora.runtime.engine import Runtime
rt = Runtime.open(sys.argv[1], budget=sys.argv[2], threads={threads}, context_length={ctx})
_ours(rt, rt.encode_prompt(PROMPT))
"""
LLAMA_CHILD = """
import sys
from benchmarks.anchors import llama_cpp_engine
llama_cpp_engine(sys.argv[1], {threads}, {ctx}, {tokens})(list(range(100, 142)))
"""


def config_of(size: str) -> dict[str, Any]:
    return {**_COMMON, **SHAPES[size]}


def params_of(cfg: dict[str, Any]) -> int:
    h, f, n = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    hd = h // cfg["num_attention_heads"]
    attn = h * hd * (2 * cfg["num_attention_heads"] + 2 * cfg["num_key_value_heads"])
    return n * (attn + 3 * h * f) + cfg["vocab_size"] * h  # the tied table counted once


def build_bundle(size: str) -> Path:
    """The random bundle of ``size`` (in its own process: torch stays out of this one)."""
    out = anchors.BENCH_CACHE / f"scaling-{size}"
    if (out / "manifest.json").is_file():
        return out
    code = f"""
import json, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from pathlib import Path
from transformers import AutoTokenizer
from bundles import random_llama_bundle
from coalora.kernels import QuantOption
from benchmarks.runtime_speed import gguf_path
g = gguf_path()
tok = AutoTokenizer.from_pretrained(g.parent, gguf_file=g.name)
o = QuantOption.parse({OPTION!r})
random_llama_bundle(Path({str(out)!r}), json.loads({json.dumps(json.dumps(config_of(size)))}),
    tok, (o,), lambda space: [space.uniform(o)], rank=16, embedding=False,
    note="random weights with {size} LLaMA/Qwen shapes (benchmark only)")
"""
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)
    return out


def _rounds(bundle: Path, gguf: Path, rounds: int) -> dict[str, Any]:
    """Interleaved decode and 512-token prefill rounds, ours and llama.cpp in this process
    (both released on return, before the peak-RSS children run)."""
    from coalora.runtime.engine import Runtime

    rt = Runtime.open(bundle, budget=BUDGET, threads=THREADS, context_length=CONTEXT)
    short = rt.encode_prompt(PROMPT)
    long = prefill_prompt(short)
    llm = anchors.llama_cpp_engine(gguf, THREADS, CONTEXT, NEW_TOKENS)
    engines = {
        "ours": lambda: _ours(rt, short),
        "llama.cpp": lambda: llm(short),
        "ours, 512-token prompt": lambda: _ours(rt, long, 2),
        "llama.cpp, 512-token prompt": lambda: llm(long),
    }
    for once in engines.values():  # warm-up
        once()
    runs = interleaved(engines, list(engines), rounds, GAP_S)
    return {
        "bits": rt.selection.entry.bits,
        "decode_tok_s": {k: [x["decode_tok_s"] for x in runs[k]] for k in ("ours", "llama.cpp")},
        "ttft_512_ms": {
            k: [x["ttft_ms"] for x in runs[f"{k}, 512-token prompt"]] for k in ("ours", "llama.cpp")
        },
        "bytes_per_token": bytes_per_token(rt, len(short) + NEW_TOKENS // 2),
        "plan_bytes": rt.selection.plan.total,
    }


def measure(size: str, rounds: int, bw: dict[str, float]) -> dict[str, Any]:
    cfg = config_of(size)
    bundle = build_bundle(size)
    gguf = anchors.random_llama_gguf(
        anchors.BENCH_CACHE / f"scaling-{size}-{GGUF_TYPE}.gguf", cfg, gguf_path(), GGUF_TYPE
    )
    timed = _rounds(bundle, gguf, rounds)
    dec, ttft = timed["decode_tok_s"], timed["ttft_512_ms"]
    bpt, plan = timed["bytes_per_token"], timed["plan_bytes"]
    # peak RSS, each engine alone in a fresh process
    env_code = {"threads": THREADS, "ctx": CONTEXT, "tokens": NEW_TOKENS}
    peaks = {}
    for name, code, args in (
        ("ours", OURS_CHILD, [str(bundle), BUDGET]),
        ("llama.cpp", LLAMA_CHILD, [str(gguf)]),
    ):
        rc, _, err, peak = run_measured([sys.executable, "-c", code.format(**env_code), *args])
        if rc != 0:
            raise SystemExit(f"{name} failed at {size}: {err.strip()[-400:]}")
        peaks[name] = peak
    return {
        "size": size,
        "config": cfg,
        "params": params_of(cfg),
        "bits": timed["bits"],
        "gguf_type": GGUF_TYPE,
        "gguf_bytes": gguf.stat().st_size,
        "decode_tok_s": dec,
        "decode_tok_s_median": {k: median(v) for k, v in dec.items()},
        "ratio_per_round": [a / b for a, b in zip(dec["ours"], dec["llama.cpp"], strict=True)],
        "ttft_512_ms": ttft,
        "ttft_512_ms_median": {k: median(v) for k, v in ttft.items()},
        "peak_rss_bytes": peaks,
        "plan_bytes": plan,
        "bytes_per_token": bpt,
        "bound_tok_s": bw["read_gb_s"] * 1e9 / bpt["total"],
        "llama_bound_tok_s": bw["read_gb_s"] * 1e9 / gguf.stat().st_size,
    }


def summary(res: dict[str, Any]) -> dict[str, Any]:
    rows = res["rows"]
    return {
        "sizes": [r["size"] for r in rows],
        "params": {r["size"]: r["params"] for r in rows},
        "decode_tok_s": {r["size"]: r["decode_tok_s_median"] for r in rows},
        "ratio_vs_llama_cpp": {r["size"]: median(r["ratio_per_round"]) for r in rows},
        "ttft_512_ms": {r["size"]: r["ttft_512_ms_median"] for r in rows},
        "peak_rss_mb": {
            r["size"]: {k: v / 1e6 for k, v in r["peak_rss_bytes"].items()} for r in rows
        },
        "peak_over_plan": {r["size"]: r["peak_rss_bytes"]["ours"] / r["plan_bytes"] for r in rows},
        "bound_fraction": {
            r["size"]: r["decode_tok_s_median"]["ours"] / r["bound_tok_s"] for r in rows
        },
        "llama_cpp_bound_fraction": {
            r["size"]: r["decode_tok_s_median"]["llama.cpp"] / r["llama_bound_tok_s"] for r in rows
        },
    }


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    x = [r["params"] / 1e9 for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, style in (("ours", "o-"), ("llama.cpp", "s--")):
        ax.plot(x, [r["decode_tok_s_median"][key] for r in rows], style, label=key)
    for r, xi in zip(rows, x, strict=True):
        ax.annotate(r["size"], (xi, r["decode_tok_s_median"]["ours"]), textcoords="offset points",
                    xytext=(4, 6), fontsize=8)  # fmt: skip
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("parameters (billions)")
    ax.set_ylabel("decode tokens/s (2 threads, median)")
    ax.set_title(f"Decode speed against size (random weights, {OPTION} vs {GGUF_TYPE})")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render(res: dict[str, Any]) -> str:
    s = res["summary"]
    lines = [
        "# Decode speed against model size: ours vs llama.cpp (random weights)",
        "",
        "**RANDOM WEIGHTS** with real LLaMA / Qwen shapes: decode speed, prefill and memory "
        "depend on shapes and bits, not on weight values, so these figures stand for trained "
        "models of the same shapes; the text is meaningless.",
        "",
        *machine_md(res["machine"], res["command"], res["wall_s"], res.get("load")),
        f"- ours: every matrix {OPTION} ({res['rows'][0]['bits']:.2f} bits per weight), tied "
        "head 8b32, rank-16 LoRA on every matrix; llama.cpp: "
        f"{GGUF_TYPE} matrices (4.5 bits per weight), Q8_0 tied embedding",
        f"- {res['rounds']} interleaved rounds, {THREADS} threads, {NEW_TOKENS} greedy tokens "
        f"(EOS ignored); TTFT of a {PREFILL_TOKENS}-token prompt; peak RSS of each engine "
        f"alone in a fresh process; memory read bandwidth {res['bandwidth']['read_gb_s']:.1f} "
        "GB/s (numpy)",
        "",
        "| size | parameters | ours tok/s | llama.cpp tok/s | ours / llama.cpp (median of "
        "rounds) | TTFT 512 ms ours / llama.cpp | peak RSS MB ours / llama.cpp | ours peak / "
        "plan | % of bound ours / llama.cpp |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        z = r["size"]
        d, t, p = s["decode_tok_s"][z], s["ttft_512_ms"][z], s["peak_rss_mb"][z]
        lines.append(
            f"| {z} | {r['params'] / 1e9:.2f}B | {d['ours']:.1f} | {d['llama.cpp']:.1f} | "
            f"**{s['ratio_vs_llama_cpp'][z]:.2f}** | {t['ours']:.0f} / {t['llama.cpp']:.0f} | "
            f"{p['ours']:.0f} / {p['llama.cpp']:.0f} | {s['peak_over_plan'][z]:.2f} | "
            f"{100 * s['bound_fraction'][z]:.0f}% / {100 * s['llama_cpp_bound_fraction'][z]:.0f}% |"
        )
    lines += [
        "",
        "Ours / llama.cpp per round (adjacent runs; the spread is the machine's noise): "
        + "; ".join(
            f"{r['size']} " + ", ".join(f"{x:.2f}" for x in r["ratio_per_round"])
            for r in res["rows"]
        )
        + ".",
        "",
        "Parameters count the tied embedding once. The bound is read bandwidth over the bytes "
        "one decode step reads (ours: quantized matrices, LM head, LoRA, KV cache at the mean "
        "position; llama.cpp: its file).",
        "",
        "![decode tok/s against size](scaling.png)",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default=",".join(SHAPES), help=f"comma-separated, of {list(SHAPES)}")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    p.add_argument("--load", default=SHARED_MACHINE, help="how loaded the machine was")
    args = p.parse_args(argv)
    if args.report_only:
        res = json.loads((RESULTS / f"{STEM}.json").read_text(encoding="utf-8"))
        (RESULTS / f"{STEM}.md").write_text(render(res), encoding="utf-8")
        return 0
    sizes = [z.strip() for z in args.sizes.split(",") if z.strip()]
    bad = [z for z in sizes if z not in SHAPES]
    if bad or not sizes or args.rounds < 1:
        print(f"error: sizes must be some of {', '.join(SHAPES)}; rounds >= 1", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    bw = bandwidth()
    rows = []
    for z in sizes:
        print(f"[scaling] {z}", file=sys.stderr, flush=True)
        rows.append(measure(z, args.rounds, bw))
    res: dict[str, Any] = {
        "rows": rows,
        "rounds": args.rounds,
        "bandwidth": bw,
        "command": "python -m benchmarks.scaling " + " ".join(argv or sys.argv[1:]),
        "machine": machine(("numpy", "onnxruntime", "llama_cpp_python")),
        "wall_s": time.perf_counter() - t0,
        "load": args.load,
    }
    res = {"summary": summary(res), **res}
    plot(res, RESULTS / f"{STEM}.png")
    write_result(STEM, res, render(res))
    print(render(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
