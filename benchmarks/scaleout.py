"""Export beyond one process: the time of a training step on SmolLM2 at 1 and 2 processes,
the peak memory of a 1.5 B-class export with layer-at-a-time quantization, and the GPU row.

    python -m benchmarks.scaleout [--rounds 3] [--big-from FILE] [--report-only]

- Steps: ``benchmarks.scaleout_child`` in one process (2 torch threads) and under torchrun
  with 2 processes (1 thread each, gloo), the same global batch; interleaved rounds, each
  child timing its steps after a warm-up. The figure is the median over rounds of each run's
  median step.
- Memory: a random-weight LLaMA of the shape ``BIG`` saved as a bf16 safetensors folder, then
  ``coalora export train`` on it (bf16 base, ``--layerwise on``, round-to-nearest, a few steps,
  a coarse sweep, the bundle written); its peak RSS is the child's ``ru_maxrss``.
- GPU: the SmolLM2 export on a GPU against this CPU, when a GPU machine was available.

Writes benchmarks/results/scaleout.json and the .md it renders to.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS,
    SHARED_MACHINE,
    interleaved,
    machine,
    machine_md,
    median,
    read_result,
    report_only_parser,
    with_summary,
)

NAME = "scaleout"
# 1.5 B class, LLaMA-shaped: hidden 2048, 28 layers, MLP 6144, GQA 16/4 heads, vocab 49152
BIG = dict(
    vocab_size=49152,
    hidden_size=2048,
    intermediate_size=6144,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=4,
    head_dim=128,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
    pad_token_id=0,
    bos_token_id=2,
    eos_token_id=3,
)
BIG_EXPORT = [
    "--dtype", "bfloat16", "--layerwise", "on", "--quantizer", "rtn",
    "--options", "2b64,4b64,8b64", "--steps", "2", "--batch-size", "2", "--seq-len", "64",
    "--configs-per-step", "1",
    "--steps-per-epoch", "0", "--calib-texts", "4", "--eval-batches", "1",
    "--budgets", "2.5:8:2.75", "--random-configs", "0", "--limit", "200", "--lm-head", "none",
    "--threads", "2", "--fresh", "--overwrite", "-q",
]  # fmt: skip
GPU_REASON = "no GPU machine was available"
LOAD_NOTE = "other jobs shared the machine during the run (see the load per round)"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _child(procs: int, steps: int, tmp: Path) -> dict[str, float]:
    out = tmp / f"steps-{procs}.json"
    out.unlink(missing_ok=True)
    child = ["-m", "benchmarks.scaleout_child", "--out", str(out), "--steps", str(steps)]
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if procs == 1:
        cmd = [sys.executable, *child, "--threads", "2"]
    else:
        env["OMP_NUM_THREADS"] = "1"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={procs}"]
        cmd += ["--master-addr=127.0.0.1", f"--master-port={_free_port()}", *child]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    res = json.loads(out.read_text())
    return {
        "step_s": median(res["timed_step_seconds"]),
        "setup_s": res["setup_s"],
        "threads": res["threads_per_process"],
        "first_loss": res["losses"][0],
    }


def step_rounds(rounds: int, steps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as tmp:
        runs = {str(n): (lambda n=n: _child(n, steps, Path(tmp))) for n in (1, 2)}
        got = interleaved(runs, ["1", "2"], rounds, gap_s=3.0)
    one = median([r["step_s"] for r in got["1"]])
    two = median([r["step_s"] for r in got["2"]])
    ratios = [a["step_s"] / b["step_s"] for a, b in zip(got["1"], got["2"], strict=True)]
    return {
        "rounds": got,
        "step_seconds_1proc": round(one, 3),
        "step_seconds_2proc": round(two, 3),
        "speedup_2proc": round(one / two, 3),
        "speedup_per_round": [round(r, 3) for r in ratios],
        "same_first_loss": all(
            abs(a["first_loss"] - b["first_loss"]) <= 1e-5 * abs(a["first_loss"])
            for a, b in zip(got["1"], got["2"], strict=True)
        ),
    }


def _make_big(folder: Path) -> dict[str, Any]:
    """The random bf16 model folder, built in a child so none of it stays in this process."""
    code = (
        "import json, sys, torch\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n"
        "from coalora.export.models import tiny_tokenizer\n"
        "torch.manual_seed(0)\n"
        "torch.set_default_dtype(torch.bfloat16)\n"
        "m = LlamaForCausalLM(LlamaConfig(**json.loads(sys.argv[2])))\n"
        "m.save_pretrained(sys.argv[1])\n"
        "tiny_tokenizer().save_pretrained(sys.argv[1])\n"
        "print(sum(p.numel() for p in m.parameters()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(folder), json.dumps(BIG)],
        check=True,
        capture_output=True,
        text=True,
    )
    params = int(done.stdout.strip().splitlines()[-1])
    quantized = BIG["num_hidden_layers"] * (
        2 * BIG["hidden_size"] ** 2
        + 2 * BIG["hidden_size"] * BIG["num_key_value_heads"] * BIG["head_dim"]
        + 3 * BIG["hidden_size"] * BIG["intermediate_size"]
    )
    return {"params": params, "quantized_params": quantized, "bf16_bytes": 2 * params}


def big_export(root: Path) -> dict[str, Any]:
    folder, bundle = root / "llama-1.5b", root / "bundle"
    t0 = time.perf_counter()
    shape = _make_big(folder)
    built = time.perf_counter() - t0
    cmd = [sys.executable, "-m", "coalora.export.cli", "export", "train", str(folder)]
    cmd += ["--out", str(bundle), "--work-dir", str(root / "work"), *BIG_EXPORT]
    t1 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"the 1.5B export failed with exit code {proc.returncode}")
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    size = sum(p.stat().st_size for p in bundle.rglob("*") if p.is_file())
    return {
        "shape": BIG,
        "export_flags": " ".join(BIG_EXPORT),
        "params": shape["params"],
        "quantized_params": shape["quantized_params"],
        "model_bf16_gb": round(shape["bf16_bytes"] / 1e9, 3),
        "peak_rss_gb": round(peak / 1e9, 3),
        "peak_over_model": round(peak / shape["bf16_bytes"], 3),
        # what the caches alone would take without layer-at-a-time: 3 options, bf16
        "all_options_cache_gb": round(3 * 2 * shape["quantized_params"] / 1e9, 3),
        "bundle_gb": round(size / 1e9, 3),
        "measured_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "build_s": round(built, 1),
        "export_s": round(time.perf_counter() - t1, 1),
    }


def _steps_note(speedup: float) -> str:
    verdict = "faster" if speedup > 1.05 else ("slower" if speedup < 0.95 else "as fast")
    return (
        f"Here 2 processes of 1 thread were {verdict} than 1 process of 2 threads. Both use the "
        "two cores; under load from other jobs one process's 2 torch threads wait on each "
        "other at every op (a descheduled thread stalls the other), which single-thread "
        "processes do not, so a loaded machine inflates the 1-process figure: read the ratio "
        "as this run's, not as data parallelism's on an idle machine."
    )


def write_md(res: dict[str, Any], out: Path = RESULTS / f"{NAME}.md") -> None:
    """The report, from the JSON alone."""
    s, steps, big = res["summary"], res["steps"], res["big"]
    check = res.get("lighter_load_check")
    earlier = ""
    if check:
        one = ", ".join(f"{x:.1f}" for x in check["step_seconds_1proc"])
        two = ", ".join(f"{x:.1f}" for x in check["step_seconds_2proc"])
        earlier = (
            f" A check before the run ({check['when_utc']} UTC, load {check['load1']}, "
            f"{check['note']}) timed {one} s/step at 1 process and {two} s at 2."
        )
    lines = [
        "# Export beyond one process",
        "",
        *machine_md(res["machine"], res["command"], res["wall_s"], SHARED_MACHINE),
        f"- load average (1 min) at the start / end: {res['load_start']:.2f} / "
        f"{res['load_end']:.2f}; {res['load_note']}",
        "",
        "## Training step on SmolLM2, 1 and 2 processes",
        "",
        f"Global batch {res['shape']['batch_size']} x {res['shape']['seq_len']} tokens, "
        f"{res['shape']['configs_per_step']} configurations per step, options "
        f"{'/'.join(res['shape']['options'])}; 1 process with 2 torch threads against "
        "torchrun with 2 processes of 1 thread (gloo), rounds interleaved, the median step "
        "after a warm-up.",
        "",
        "| round | 1 process (s/step) | 2 processes (s/step) | speed-up | load (1 min) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for i, (a, b) in enumerate(zip(steps["rounds"]["1"], steps["rounds"]["2"], strict=True)):
        lines.append(
            f"| {i + 1} | {a['step_s']:.2f} | {b['step_s']:.2f} | "
            f"{a['step_s'] / b['step_s']:.2f}x | {b['load1']:.2f} |"
        )
    lines += [
        f"| median | {s['step_seconds_1proc']:.2f} | {s['step_seconds_2proc']:.2f} | "
        f"{s['speedup_2proc']:.2f}x | |",
        "",
        f"The first step's loss agrees between 1 and 2 processes in every round: "
        f"{'yes' if steps['same_first_loss'] else 'no'}. {_steps_note(s['speedup_2proc'])}"
        f"{earlier}",
        "",
        "## Peak memory of a 1.5 B-class export (layer-at-a-time quantization)",
        "",
        f"Random-weight LLaMA: hidden {big['shape']['hidden_size']}, "
        f"{big['shape']['num_hidden_layers']} layers, MLP {big['shape']['intermediate_size']}, "
        f"{big['shape']['num_attention_heads']}/{big['shape']['num_key_value_heads']} heads, "
        f"vocab {big['shape']['vocab_size']} (tied): {big['params'] / 1e9:.3f} B parameters, "
        f"{big['quantized_params'] / 1e9:.3f} B of them quantized. "
        f"`coalora export train` flags: `{big['export_flags']}`.",
        "",
        "| | GB |",
        "|---|---:|",
        f"| the model in bf16 | {big['model_bf16_gb']:.2f} |",
        f"| every option's dequantized weights (what the cache would hold without "
        f"--layerwise) | {big['all_options_cache_gb']:.2f} |",
        f"| **peak RSS of the export** | **{big['peak_rss_gb']:.2f}** |",
        f"| the bundle on disk | {big['bundle_gb']:.2f} |",
        "",
        f"Peak RSS / model size: {big['peak_over_model']:.2f}. The export took "
        f"{big['export_s']:.0f} s (building the random folder {big['build_s']:.0f} s more); "
        f"measured {big.get('measured_utc', '?')} UTC, the step times "
        f"{res.get('steps_measured_utc', '?')} UTC.",
        "",
        "## GPU",
        "",
        "SmolLM2 export on a GPU against this CPU: "
        + (
            f"{s['gpu_ratio']:.2f}x"
            if s["gpu_ratio"] is not None
            else f"not measured ({s['gpu_reason']})."
        ),
        "",
    ]
    out.write_text("\n".join(lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    p = report_only_parser(__doc__)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=6, help="steps per child, warm-up included")
    p.add_argument("--big-from", help="a JSON of the 1.5B row measured before (--big-only)")
    p.add_argument("--big-only", help="measure the 1.5B row alone and write it to this JSON")
    args = p.parse_args(argv)
    path = RESULTS / f"{NAME}.json"
    if args.report_only:
        write_md(read_result(path))
        return
    from benchmarks.scaleout_child import SHAPE

    t0 = time.perf_counter()
    load_start = os.getloadavg()[0]
    if args.big_from:
        big = json.loads(Path(args.big_from).read_text(encoding="utf-8"))
    else:
        root = Path(tempfile.mkdtemp(prefix="coalora-big-"))
        try:
            big = big_export(root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        if args.big_only:
            Path(args.big_only).write_text(json.dumps(big, indent=2), encoding="utf-8")
            return
    steps = step_rounds(args.rounds, args.steps)
    res = {
        "command": "python -m benchmarks.scaleout"
        + (" --big-from <the row of an earlier --big-only run>" if args.big_from else ""),
        "steps_measured_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        "machine": machine(),
        "wall_s": round(time.perf_counter() - t0, 1),
        "load_start": load_start,
        "load_end": os.getloadavg()[0],
        "load_note": LOAD_NOTE,
        "shape": {**SHAPE, "options": list(SHAPE["options"])},
        "steps": steps,
        "big": big,
        "summary": {
            "step_seconds_1proc": steps["step_seconds_1proc"],
            "step_seconds_2proc": steps["step_seconds_2proc"],
            "speedup_2proc": steps["speedup_2proc"],
            "peak_rss_gb_1_5b": big["peak_rss_gb"],
            "model_params_1_5b": big["params"],
            "model_bf16_gb_1_5b": big["model_bf16_gb"],
            "gpu_ratio": None,
            "gpu_reason": GPU_REASON,
        },
    }
    res = with_summary(res, res["summary"])
    path.write_text(json.dumps(res, indent=2) + "\n", encoding="utf-8")
    write_md(res)


if __name__ == "__main__":
    main()
