"""What benchmarks/runtime_speed.py measures in a fresh process (``--child KIND ...``), so
one measurement's memory and threads never leak into another's: peak RSS while opening and
switching, onnxruntime's per-op profile, and graph variants side by side."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import proc_status
from benchmarks.runtime_speed import CONTEXT, NEW_TOKENS, PROMPT, THREADS, _ours


def _reset_peak() -> None:
    """Reset VmHWM to the current RSS (Linux: /proc/self/clear_refs, value 5)."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def child_memory(bundle: str, budget: str, switch_to: str) -> dict[str, Any]:
    """Run in a fresh process that imports only the runtime: peak RSS while opening at
    ``budget``, steady RSS after 128 tokens, then peak RSS while switching to ``switch_to``."""
    from coalora.runtime.engine import Runtime

    start = proc_status()
    _reset_peak()
    t0 = time.perf_counter()
    rt = Runtime.open(bundle, budget=budget, threads=THREADS, context_length=CONTEXT)
    open_s = time.perf_counter() - t0
    opened = proc_status()
    plan = rt.selection.plan
    open_bits = rt.selection.entry.bits
    open_timings = rt.timings.to_dict()
    ids = rt.encode_prompt(PROMPT)
    _ours(rt, ids)
    served = proc_status()
    served_peak = served["VmHWM"]
    _reset_peak()
    t0 = time.perf_counter()
    rt.switch(switch_to)
    switch_s = time.perf_counter() - t0
    switched = proc_status()
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


def variant_decoder(
    rt: Any,
    adapters: dict[str, Any],
    *,
    fuse: bool,
    lora_bits: int,
    threads: int,
    config: dict[str, str] | None = None,
) -> tuple[Any, Any, int]:
    """A decoder, its built session (keep it: it holds what the session reads) and the graph's
    node count for ``rt``'s configuration, as the runtime builds it but for the graph's form:
    fused or not, the LoRA at ``lora_bits`` (0: no side branch)."""
    from coalora.runtime import assemble
    from coalora.runtime import session as session_mod
    from coalora.runtime.generate import KVDecoder
    from coalora.runtime.mapped import Scratch

    mapped = assemble.MappedBundle(rt.bundle)
    scratch = Scratch()  # the fused weights and packed LoRA
    proto, arrays = assemble.build_graph(
        mapped, rt.arch, rt.config, context_length=CONTEXT,
        lora_bits=lora_bits or assemble.DEFAULT_LORA_BITS,
        adapters=adapters if lora_bits else None, external=True, fuse=fuse, scratch=scratch,
        last_logits=True, with_lora=bool(lora_bits),
    )  # fmt: skip
    nodes = len(proto.graph.node)  # the session takes the proto's contents
    built = session_mod.create_session(proto, threads=threads, initializers=arrays, config=config)
    built.keep += [scratch, mapped]  # the session reads views of both
    rows = assemble.head_table_rows(mapped, rt.arch, assemble.DEFAULT_ACCURACY_LEVEL, rt.config)
    return KVDecoder(built.session, rt.arch, CONTEXT, rows=rows), built, nodes


def child_variants(bundle: str, budget: str, steps: str = "40") -> dict[str, Any]:
    """Best-case ms/token (1 thread; each node's fastest of ``steps`` decode steps, summed:
    robust to other load on the machine) of graph variants at ``budget``'s configuration."""
    from coalora.runtime.engine import Runtime

    n_steps = int(steps)
    rt = Runtime.open(bundle, budget=budget, threads=1, context_length=CONTEXT, build=False)
    adapters, _ = rt._adapters(rt.config)
    out: dict[str, Any] = {}
    with profiling_sessions("variants"):
        for _rep in range(2):
            for name, fuse, bits in VARIANTS:
                dec, built, _ = variant_decoder(rt, adapters, fuse=fuse, lora_bits=bits, threads=1)
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
