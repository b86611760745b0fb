"""The report of benchmarks/runtime_speed.py, rendered from its JSON alone (so
``python -m benchmarks.runtime_speed --report-only`` rewrites the committed .md byte for
byte)."""

from __future__ import annotations

from typing import Any

from benchmarks.runtime_speed import GAP_S

NOTES = [
    "- How the session is built (runtime/session.py, runtime/graphs/_onnx.py): the graph "
    "builders write every initializer of 1 kB or more as an external-data reference to a "
    "placeholder file nobody reads, and hand the arrays themselves (views of the "
    "memory-mapped bundle) to onnxruntime with `SessionOptions.add_initializer`, which uses "
    "them in place. Before, the builders copied every weight into the ModelProto and the "
    "peak while opening the ~4.5-bit configuration was 985 MB against a 303 MB plan.",
    "- While onnxruntime builds the session a thread drops the mapped pages every 5 ms "
    "(MADV_DONTNEED; a page still being read faults back in from the file): MatMulNBits "
    "prepacks B, scales and zero points into its own buffers at accuracy_level 4 on x86-64 "
    "and on ARM with dot product, and does not read the originals again, so building holds "
    "about one copy of the quantized weights instead of two.",
    "- Fusion without the memory: fused q/k/v and gate/up (and the packed LoRA) are built "
    "into shared maps of an unlinked scratch file (`runtime.mapped.Scratch`) whose pages are "
    "given back right after the session exists; a page read again reloads from the file "
    "(a Cortex-A72 without dot product does read some of them: see docs/arm64-smoke.md). "
    "The variants table shows what fusion buys: one LoRA slot per fused group halves the "
    "LoRA nodes.",
    "- LoRA: 8-bit storage (MatMulNBits) beats fp32 MatMul; its cost is per node "
    "(A, B and an Add per slot, ~8-10 us each on this machine), not bytes, so block size of "
    "B (16 vs 32) made no difference (measured). Cheaper forms not taken here because they "
    "change numerics and need a quality check on a trained bundle: quantizing A' at the "
    "base matrix's option and stacking it under W (one MatMulNBits + Split instead of a "
    "separate A node), or stacking B next to W along K.",
    "- A group-constant adapter (QA-LoRA style) folds exactly into the zero points, but "
    "only as float zero points: MatMulNBits then leaves its fast path at 2 and 4 bits and "
    "refuses them at 8 bits (measured: benchmarks/results/zero_points.md), so that fold is "
    "not taken.",
    "- Logits are computed for the last position only (a prefill runs the LM head once): "
    "a 128-token prompt held 25 MB more activations and ran the head 128 times before.",
    "- After a switch drops the old session, glibc keeps the freed heap (~120 MB measured); "
    "the runtime calls malloc_trim. The memory plan now includes the loaded tokenizer "
    "(~27x its tokenizer.json as the runtime loads it, measured 42 MB for SmolLM2) and the "
    "fused LoRA slots.",
    "- The token embedding is gathered from the tied LM head's own 8-bit codes "
    "(GatherBlockQuantized), so no fp32 table is read or held; each run is fed only its "
    "tokens' rows, read from the bundle file (runtime/table_rows.py), so the table is held "
    "once, as the head's prepacked copy (benchmarks/results/serving_memory.md).",
    "- onnxruntime-genai's int4 model (block 32, LM head included) has 343 nodes (151 "
    "MatMulNBits, 60 SkipSimplifiedLayerNormalization, 30 GroupQueryAttention, counted in "
    "its model.onnx), about as many as our graph without the LoRA side branch (312 in the "
    "variants table); the side branch's ~370 nodes are most of the gap to it.",
    "- The machine is shared: wall-clock figures move with the other jobs' load (see the "
    "load averages and the per-round numbers in the JSON). Two threads that wait for each "
    "other suffer most when another process holds a core (llama.cpp alone measured ~100 "
    "tok/s on 2 threads at load 2.4 and 13-17 tok/s at load 5); the 1-thread comparison and "
    "the best-case tables are the load-robust ones.",
]


def _mb(x: float) -> str:
    return f"{x / 1e6:.0f}"


def _peers(res: dict[str, Any]) -> list[str]:
    """The peers of the same rounds and the contended rounds, where the run measured them."""
    peers, ref = res.get("peers"), res["ratio_at_reference"]["budget"]
    if not peers:
        return []
    lines = [
        f"## Against every peer (same rounds, {res['threads']} threads, ours at {ref})",
        "",
        f"llama.cpp + LoRA: the package GGUF with a rank-{res['lora_gguf_rank']} LoRA GGUF on "
        "every matrix we adapt (random values). onnxruntime-genai: its model builder's int4 "
        "CPU model of the same weights (`benchmarks/anchors.py`).",
        "",
        "| peer | decode tok/s median (best) | TTFT ms | ours / peer, median of rounds | rounds |",
        "|---|---|---|---|---|",
    ]
    for k, v in peers.items():
        lines.append(
            f"| {k} | {v['decode_tok_s_median']:.1f} ({v['decode_tok_s_best']:.1f}) | "
            f"{v['ttft_ms_median']:.0f} | **{v['ours_over_peer']:.2f}** | "
            + ", ".join(f"{x:.2f}" for x in v["ours_over_peer_per_round"])
            + " |"
        )
    c = res.get("contended")
    if c:
        spins = {True: "on", False: "off", None: "?"}[c["ours_spins"]]
        lines += [
            "",
            f"Contended ({c['busy_cores']} core held by a busy loop; ours opened after it "
            f"started, `--spin auto` chose spinning {spins}), {res['threads']} threads each: "
            + "; ".join(f"{k} {v:.1f} tok/s" for k, v in c["decode_tok_s_median"].items())
            + f". Ours / the faster peer of each round: median **{c['ours_over_best_peer']:.2f}**"
            " (rounds: " + ", ".join(f"{x:.2f}" for x in c["ours_over_best_peer_per_round"]) + ").",
        ]
    f = res.get("prefill")
    if f:
        lines += [
            "",
            f"Prefill of a {f['prompt_tokens']}-token prompt (same rounds' peers, interleaved, "
            "median TTFT): "
            + "; ".join(
                f"{k} {f['ttft_ms_median'][k]:.0f} ms ({f['prefill_tok_s_median'][k]:.0f} tok/s)"
                for k in f["ttft_ms_median"]
            )
            + ". Ours / peer in prefill speed: "
            + ", ".join(f"{k} **{v:.2f}**" for k, v in f["ours_over_peer"].items())
            + ".",
        ]
    return lines + [""]


def _prediction(res: dict[str, Any]) -> list[str]:
    """``--min-speed``'s predicted tok/s against the measured median, per budget (absent from
    results before the prediction was part of this benchmark)."""
    pred = res.get("prediction")
    if not pred:
        return []
    rows = [(b, r) for b, r in res["budgets"].items() if "prediction_error" in r]
    worst = max(r["prediction_error"] for _, r in rows)
    c = pred["costs"]
    return [
        "## Predicted against measured (`--min-speed`)",
        "",
        "The runtime's prediction (runtime/speed.py: bytes read per option x the measured "
        "seconds per weight, fp32 values, nodes x the measured seconds per node) at position "
        f"{pred['position']}, from costs measured in this run before any decode ("
        + ", ".join(f"{k} {v * 1e12:.0f} ps/weight" for k, v in c["seconds_per_weight"].items())
        + f", {c['node_seconds'] * 1e6:.1f} us/node), calibrated by the warm-up decode at "
        f"{pred['calibrated_by']} (x{pred['calibration']:.2f}, as the runtime's first decode "
        "calibrates; the warm-up is not one of the measured rounds).",
        "",
        "| budget | predicted tok/s | measured tok/s (median) | error |",
        "|---|---:|---:|---:|",
        *(
            f"| {b} | {r['predicted_tok_s']:.1f} | {r['decode_tok_s_median']:.1f} | "
            f"{100 * r['prediction_error']:.1f}% |"
            for b, r in rows
        ),
        "",
        f"Largest error: **{100 * worst:.1f}%**.",
        "",
    ]


def report(res: dict[str, Any]) -> str:
    m, bw = res["machine"], res["bandwidth"]
    v = m.get("versions", m)  # results before benchmarks/common.py kept versions at the top
    lc = res["llama_cpp"]
    ratio = res["ratio_at_reference"]
    lines = [
        "# Runtime speed and memory vs llama.cpp (SmolLM2-135M)",
        "",
        (
            "**RANDOM WEIGHTS**: a bundle with SmolLM2-135M-Instruct's exact shapes, options, "
            "LoRA rank and θ, but random values (`--random-bundle`). Decode speed and memory "
            "depend only on shapes and options, not on values, so the speed and memory figures "
            "stand for a trained bundle; the generated text is meaningless."
            if res["random_weights"]
            else f"Bundle: `{res['bundle']}`."
        ),
        "",
        f"Machine: {m['cpu']}, {m.get('logical_cores', m.get('cores'))} logical / "
        f"{m['physical_cores']} physical cores, {m['ram_gb']} GB RAM, Linux {m['kernel']}; "
        f"Python {v['python']}, numpy {v['numpy']}, onnxruntime {v['onnxruntime']}, "
        f"llama-cpp-python {v['llama_cpp_python']}"
        + (f", onnxruntime-genai {v['onnxruntime-genai']}" if "onnxruntime-genai" in v else "")
        + ".",
        f"Load average (1/5/15 min) before: {', '.join(f'{x:.2f}' for x in res['load_before'])}"
        f"; after: {', '.join(f'{x:.2f}' for x in res['load_after'])}.",
        f"Command: `{res['command']}`",
        "",
        f"{res['new_tokens']} greedy tokens (EOS ignored by both) after a "
        f"{res['prompt_tokens']}-token chat prompt, {res['threads']} threads, context "
        f"{res['context']}; {res['rounds']} interleaved rounds (each round: ours at "
        f"{ratio['budget']}, "
        + (
            f"{', '.join(res['peers'])}, ours and llama.cpp again on 1 thread"
            if res.get("peers")
            else "llama.cpp, both again on 1 thread"
        )
        + ", ours at the other budgets; "
        f"{GAP_S} s idle before each run). Decode tok/s counts the "
        "127 steps after the first token; TTFT is prompt to first token. Memory bandwidth "
        f"(numpy, 512 MB, best of 5): read {bw['read_gb_s']:.1f} GB/s, copy "
        f"{bw['copy_gb_s']:.1f} GB/s; the bound is read bandwidth / bytes read per token "
        "(quantized matrices + LM head + LoRA + embedding row + KV cache at the mean "
        "position).",
        "",
        "## Decode speed",
        "",
        "| budget | bits | options | decode tok/s median (best) | TTFT ms | bytes/token MB "
        "| bound tok/s | % of bound | vs llama.cpp | adapter θ + fold ms |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for b, r in res["budgets"].items():
        bpt = r["bytes_per_token"]["total"]
        lines.append(
            f"| {b} | {r['bits']:.2f} | {' '.join(r['config_options'])} | "
            f"{r['decode_tok_s_median']:.1f} ({r['decode_tok_s_best']:.1f}) | "
            f"{r['ttft_ms_median']:.0f} | {bpt / 1e6:.1f} | {r['bandwidth_bound_tok_s']:.0f} | "
            f"{100 * r['decode_tok_s_median'] / r['bandwidth_bound_tok_s']:.0f}% | "
            f"{r['decode_tok_s_median'] / lc['decode_tok_s_median']:.2f} | "
            f"{1e3 * r['adapter']['theta_s']:.1f} + {1e3 * r['adapter']['fold_s']:.1f} |"
        )
    lines.append(
        f"| llama.cpp | Q4_1 (5.0) | {lc['gguf']} | {lc['decode_tok_s_median']:.1f} "
        f"({lc['decode_tok_s_best']:.1f}) | {lc['ttft_ms_median']:.0f} | "
        f"{lc['gguf_bytes'] / 1e6:.1f} (file) | {lc['bandwidth_bound_tok_s']:.0f} | "
        f"{100 * lc['decode_tok_s_median'] / lc['bandwidth_bound_tok_s']:.0f}% | 1.00 | - |"
    )
    lines += [
        "",
        f"Ratio ours / llama.cpp at {ratio['budget']} (per round, adjacent runs): median "
        f"**{ratio['median']:.2f}**; rounds: {', '.join(f'{x:.2f}' for x in ratio['per_round'])}.",
        "",
        "On one thread each (same rounds, interleaved): "
        + "; ".join(
            f"{k} {v['median']:.1f} tok/s median ({v['best']:.1f} best), TTFT "
            f"{v['ttft_ms_median']:.0f} ms"
            for k, v in ratio["one_thread_tok_s"].items()
        )
        + f"; ratio median **{ratio['one_thread_median']:.2f}** (rounds: "
        + ", ".join(f"{x:.2f}" for x in ratio["one_thread_per_round"])
        + ").",
        "",
        *_peers(res),
        *_prediction(res),
        "## Memory (each row a fresh process that imports only the runtime)",
        "",
        "Opened with a byte budget equal to the plan of the configuration (so 'peak <= "
        "budget' is the tight check), then 128 tokens served, then switched to the next "
        "row's budget. Peak is VmHWM, reset through /proc/self/clear_refs right before "
        "open() and right before switch() (so a switch's peak includes the RSS it starts "
        "from). Plans include the loaded tokenizer.",
        "",
        "| budget | bits | plan MB | open peak MB | peak / plan | <= budget | open s | RSS "
        "serving MB | serving / plan | switch to | switch s | switch peak MB | new plan MB | "
        "peak / max(plans) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["memory"]:
        plan, plan2 = r["open_plan"]["total"], r["switch_plan"]["total"]
        budget = int(r["budget"].removesuffix("MB")) * 10**6
        lines.append(
            f"| {r['budget']} | {r['bits']:.2f} | {_mb(plan)} | {_mb(r['open_peak'])} | "
            f"{r['open_peak'] / plan:.2f} | {'yes' if r['open_peak'] <= budget else 'NO'} | "
            f"{r['open_s']:.2f} | {_mb(r['served_rss'])} | {r['served_rss'] / plan:.2f} | "
            f"{r['switch_to']} ({r['switch_bits']:.2f} bits) | {r['switch_s']:.2f} | "
            f"{_mb(r['switch_peak'])} | {_mb(plan2)} | {r['switch_peak'] / max(plan, plan2):.2f} |"
        )
    lines += ["", "Switch time split (s): θ, fold, graph, session:", ""]
    for r in res["memory"]:
        t = r["switch_timings"]
        lines.append(
            f"- to {r['switch_to']}: {t['theta_s']:.3f}, {t['fold_s']:.3f}, {t['graph_s']:.3f}, "
            f"{t['session_s']:.3f}"
        )
    p = res.get("profile")
    if p:
        lines += [
            "",
            f"## Where a token's time goes ({p['budget']}, onnxruntime profiling, "
            f"{res['threads']} threads)",
            "",
            f"Kernel time {p['kernel_ms_per_token']:.2f} ms/token over {p['steps']} decode "
            f"steps; best case (each node's fastest run, summed) "
            f"{p['best_case_ms_per_token']:.2f} ms/token. LoRA side branch: "
            f"{100 * p['lora_share']:.0f}% of kernel time; LM head: "
            f"{100 * p['lm_head_share']:.0f}%.",
            "",
            "| op | share |",
            "|---|---|",
        ]
        lines += [f"| {k} | {100 * v:.1f}% |" for k, v in p["share"].items() if v >= 0.002]
        variants = p.get("variants")
        if variants:
            lines += [
                "",
                "## Graph variants (same configuration, best case, 1 thread)",
                "",
                "Each node's fastest run over 40 decode steps, summed (load-robust: what a token "
                "costs when nothing else takes the core; framework time between nodes left "
                "out), best of 2 builds.",
                "",
                "| variant | ms/token | tok/s | LoRA ms | nodes |",
                "|---|---|---|---|---|",
            ]
            lines += [
                f"| {k} | {v['best_case_ms_per_token']:.2f} | "
                f"{1e3 / v['best_case_ms_per_token']:.0f} | {v['lora_ms']:.2f} | {v['nodes']} |"
                for k, v in variants.items()
            ]
    lines += ["", "## Notes", "", *NOTES]
    return "\n".join(lines) + "\n"
