"""Which MatMulNBits path each quantization option takes on a CPU, told by what it costs.

One decode step of one SmolLM2-135M layer's matrices (fused q/k/v 576->960, o 576->576,
fused gate/up 576->3072, down 1536->576; one token, one thread) is timed for every option
(bits {2, 4, 8} x blocks {32, 64, 128}) at accuracy levels 4 (int8 activations, what the
runtime serves) and 0 (fp32), plus two candidate fast forms for 8 bits: symmetric 8-bit
(no zero points) and the weights dequantized once to an fp32 MatMul. The variants run in
interleaved rounds in one process (a round keeps the fastest of a few runs of each); each
figure is the median over rounds of the variant's time divided by 4-bit's at the same block
size and level in the same round. A path that
dequantizes the whole matrix on every call shows as an order of magnitude, not a few percent.

The error against a numpy reference tells the arithmetic apart: int8 activations leave
~1e-3 relative error, fp32 compute ~1e-7.

    python -m benchmarks.arm_paths                 # this host + emulated cortex-a72 and a76
    python -m benchmarks.arm_paths --cpus none     # this host only (no root needed)
    python -m benchmarks.arm_paths --report-only   # rewrite the .md from the .json

The emulated CPUs run through ``scripts/smoke_arm64.sh --measure`` (root, qemu-user; see
docs/arm64-smoke.md): the same file runs inside the arm64 rootfs with the device install
(numpy, onnx, onnxruntime), so this module's measuring half imports nothing else.
Emulated absolute times mean nothing; ratios on the same emulated CPU do.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
JSON_PATH = RESULTS / "arm_paths.json"
MD_PATH = RESULTS / "arm_paths.md"

# SmolLM2-135M: hidden 576, 9 query / 3 kv heads of 64, intermediate 1536 (the runtime fuses
# q/k/v and gate/up into one node each).
LAYER = (("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576))
BITS = (2, 4, 8)
BLOCKS = (32, 64, 128)
LEVELS = (4, 0)
# Above this ratio to 4-bit an option is "slow" on a CPU (the dequantize-every-call path
# measures 10x and more; the packed kernels stay within 2x of each other).
SLOW_RATIO = 3.0
INT8_ERROR = 1e-4  # relative error above this: activations were quantized to int8


def variant_names(
    blocks: tuple[int, ...] = BLOCKS, level0_blocks: tuple[int, ...] = BLOCKS
) -> list[str]:
    """Every option at level 4; at level 0 the ``level0_blocks`` (emulation: block 32 only,
    its dequantize-every-call variants cost seconds a run)."""
    names = [f"{b}b{g}@4" for g in blocks for b in BITS]
    names += [f"{b}b{g}@0" for g in level0_blocks for b in BITS]
    names += [f"8b{g}sym@4" for g in blocks]
    return [*names, "fp32"]


def _weights(rng: np.random.Generator, k: int, n: int, bits: int, block: int, zp: bool) -> dict:
    nb = -(-k // block)
    blob = block * bits // 8
    return {
        "b": rng.integers(0, 256, size=(n, nb, blob), dtype=np.uint8),
        "scales": (rng.random(n * nb, dtype=np.float32) * 0.02 + 0.001).astype(np.float32),
        "zp": rng.integers(0, 256, size=n * (-(-nb * bits // 8)), dtype=np.uint8) if zp else None,
    }


def _dequant(w: dict, k: int, n: int, bits: int, block: int) -> np.ndarray:
    """Numpy reference of MatMulNBits' weight [N, K] (low bits first, as onnxruntime packs)."""
    nb = -(-k // block)
    per = 8 // bits
    shifts = np.arange(per, dtype=np.uint8) * bits
    mask = np.uint8((1 << bits) - 1)
    codes = ((w["b"][..., None] >> shifts) & mask).reshape(n, nb, block).astype(np.float32)
    if w["zp"] is None:
        zero = np.float32(1 << (bits - 1))
        zeros = np.full((n, nb, 1), zero, dtype=np.float32)
    else:
        zrow = w["zp"].reshape(n, -1)
        z = ((zrow[..., None] >> shifts) & mask).reshape(n, -1)[:, :nb]
        zeros = z.astype(np.float32)[..., None]
    deq = (codes - zeros) * w["scales"].reshape(n, nb, 1)
    return deq.reshape(n, nb * block)[:, :k]


def build(variant: str, seed: int = 0) -> tuple[bytes, dict[str, np.ndarray], dict]:
    """A graph of one layer's matrices at ``variant``; its inputs and numpy reference outputs."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inputs = {f"x{k}": rng.standard_normal((1, k)).astype(np.float32) for k in (576, 1536)}
    nodes, inits, outs, ref = [], [], [], {}
    for name, k, n in LAYER:
        x = f"x{k}"
        if variant == "fp32":
            wf = rng.standard_normal((n, k)).astype(np.float32) * 0.02
            inits.append(numpy_helper.from_array(np.ascontiguousarray(wf.T), f"{name}.w"))
            nodes.append(helper.make_node("MatMul", [x, f"{name}.w"], [name]))
        else:
            opt, level = variant.split("@")
            sym = opt.endswith("sym")
            bits, block = (int(v) for v in opt.removesuffix("sym").split("b"))
            w = _weights(rng, k, n, bits, block, zp=not sym)
            wf = _dequant(w, k, n, bits, block)
            names = [f"{name}.q", f"{name}.s"] + ([] if sym else [f"{name}.z"])
            inits.append(numpy_helper.from_array(w["b"], names[0]))
            inits.append(numpy_helper.from_array(w["scales"], names[1]))
            if not sym:
                inits.append(numpy_helper.from_array(w["zp"], names[2]))
            nodes.append(
                helper.make_node(
                    "MatMulNBits",
                    [x, *names],
                    [name],
                    domain="com.microsoft",
                    K=k,
                    N=n,
                    bits=bits,
                    block_size=block,
                    accuracy_level=int(level),
                )
            )
        ref[name] = inputs[x].astype(np.float64) @ wf.T.astype(np.float64)
        outs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, [1, n]))
    graph = helper.make_graph(
        nodes,
        "layer",
        [helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [1, k]) for k in (576, 1536)],
        outs,
        initializer=inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 8
    return model.SerializeToString(), inputs, ref


def _session(model: bytes) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def _hwcap() -> dict[str, bool]:
    """The arm64 HWCAP bits that decide MLAS' kernels (empty elsewhere)."""
    if platform.machine() not in ("aarch64", "arm64"):
        return {}
    import ctypes

    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    hw, hw2 = libc.getauxval(16), libc.getauxval(26)
    return {"asimddp": bool(hw >> 20 & 1), "i8mm": bool(hw2 >> 13 & 1)}


def measure(label: str, rounds: int, reps: int, level0_blocks: tuple[int, ...] = BLOCKS) -> dict:
    """Time every variant in interleaved rounds on this CPU; one thread."""
    import onnxruntime as ort

    t_start = time.perf_counter()
    names = variant_names(BLOCKS, level0_blocks)
    sessions, feeds, errors, build_s = {}, {}, {}, {}
    for v in names:
        model, inputs, ref = build(v)
        t0 = time.perf_counter()
        sess = _session(model)
        build_s[v] = time.perf_counter() - t0
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs), strict=True))
        errors[v] = max(
            float(np.abs(got[k] - r).max() / (np.abs(r).max() + 1e-30)) for k, r in ref.items()
        )
        sessions[v], feeds[v] = sess, inputs
    times: dict[str, list[float]] = {v: [] for v in names}
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]  # rotate the start each round
        for v in order:
            sess, inp = sessions[v], feeds[v]
            sess.run(None, inp)
            best = float("inf")
            for _ in range(reps):  # the fastest of a few runs: a busy core only adds time
                t0 = time.perf_counter()
                sess.run(None, inp)
                best = min(best, time.perf_counter() - t0)
            times[v].append(best)
    variants = {}
    for v in names:
        if v == "fp32":
            ref_name = "4b32@4"
        else:
            opt, level = v.split("@")
            ref_name = f"4b{opt.removesuffix('sym').split('b')[1]}@{level}"
        ratios = [a / b for a, b in zip(times[v], times[ref_name], strict=True)]
        variants[v] = {
            "us_median": 1e6 * statistics.median(times[v]),
            "vs_4bit": statistics.median(ratios),
            "vs_4bit_same_level_ref": ref_name,
            "vs_4b32_level4": statistics.median(
                [a / b for a, b in zip(times[v], times["4b32@4"], strict=True)]
            ),
            "rel_error": errors[v],
            "compute": "int8" if errors[v] > INT8_ERROR else "fp32",
            "session_s": build_s[v],
        }
    return {
        "label": label,
        "machine": platform.machine(),
        "hwcap": _hwcap(),
        "onnxruntime": ort.__version__,
        "numpy": np.__version__,
        "rounds": rounds,
        "reps": reps,
        "wall_s": time.perf_counter() - t_start,
        "variants": variants,
    }


# -- the driver (host only) ------------------------------------------------------------------
def _emulated(cpus: list[str], rounds: int, reps: int) -> dict[str, dict]:
    import subprocess

    cmd = [
        "bash",
        str(ROOT / "scripts" / "smoke_arm64.sh"),
        "--cpus",
        " ".join(cpus),
        "--measure",
        str(Path(__file__).resolve()),
        "--measure-args",
        f"--rounds {rounds} --reps {reps} --level0-blocks 32",
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    import os

    cache = Path(os.environ.get("SMOKE_ARM64_CACHE", ROOT / ".cache" / "arm64"))
    return {c: json.loads((cache / "run" / "out" / c / "measure.json").read_text()) for c in cpus}


def summarize(runs: dict[str, dict]) -> dict[str, Any]:
    """``{cpu: {option: cost relative to 4-bit}}`` plus the slow options per CPU."""
    rel = {
        cpu: {v: round(d["vs_4bit"], 2) for v, d in run["variants"].items()}
        for cpu, run in runs.items()
    }
    slow = {
        cpu: sorted(
            v
            for v, d in run["variants"].items()
            if v.endswith("@4") and "sym" not in v and d["vs_4bit"] >= SLOW_RATIO
        )
        for cpu, run in runs.items()
    }
    return {
        "relative_to_4bit": rel,
        "slow_at_level4": slow,
        "slow_ratio": SLOW_RATIO,
        "compute": {
            cpu: {v: d["compute"] for v, d in run["variants"].items()} for cpu, run in runs.items()
        },
    }


def report(res: dict[str, Any]) -> str:
    sys.path.insert(0, str(ROOT))
    from benchmarks.quantizer_error import machine_md

    runs = res["runs"]
    cpus = list(runs)
    lines = [
        "# MatMulNBits path per option: x86 host, emulated Cortex-A72 (Pi 4), Cortex-A76 (Pi 5)",
        "",
        "One decode step (one token) of one SmolLM2-135M layer's matrices: fused q/k/v "
        "576->960, o 576->576, fused gate/up 576->3072, down 1536->576; random weights; "
        "onnxruntime, one thread. Each cell: the median over interleaved rounds (each the "
        "fastest of a few runs) of the option's time divided by 4-bit's at the same block "
        "size and accuracy level, in the same round (the `fp32` row: divided by 4b32 at "
        "level 4). After each ratio the arithmetic it shows: `int8` (activations quantized "
        f"to int8: relative error against numpy above {INT8_ERROR:g}), `fp32` (error "
        f"~1e-7), and `DEQ` where the cost is {SLOW_RATIO:g}x or more: the whole matrix "
        "dequantized to fp32 on every call.",
        "",
        "Emulated (qemu-user TCG) absolute times mean nothing; ratios on the same emulated "
        "CPU show which kernel runs. The x86 column is measured natively.",
        "",
        "| option | " + " | ".join(cpus) + " |",
        "| --- | " + " | ".join("---:" for _ in cpus) + " |",
    ]
    for v in runs[cpus[0]]["variants"]:
        cells = []
        for c in cpus:
            d = runs[c]["variants"].get(v)
            if d is None:
                cells.append("not run")
                continue
            tag = "DEQ" if d["vs_4bit"] >= SLOW_RATIO and v != "fp32" else d["compute"]
            cells.append(f"{d['vs_4bit']:.2f}x {tag}")
        lines.append(f"| {v} | " + " | ".join(cells) + " |")
    lines += ["", "Median time of the 4-bit reference per CPU (us per layer step):", ""]
    for c in cpus:
        v = runs[c]["variants"]
        lines.append(
            f"- {c}: 4b32@4 {v['4b32@4']['us_median']:.0f} us, 4b32@0 "
            f"{v['4b32@0']['us_median']:.0f} us, fp32 {v['fp32']['us_median']:.0f} us "
            f"(onnxruntime {runs[c]['onnxruntime']}, {runs[c]['machine']}, HWCAP "
            f"{runs[c]['hwcap'] or 'n/a'}, {runs[c]['rounds']} rounds x {runs[c]['reps']} runs)"
        )
    s = res["summary"]
    lines += ["", "## Slow at accuracy level 4 (the serving path)", ""]
    for c in cpus:
        lines.append(f"- {c}: {', '.join(s['slow_at_level4'][c]) or 'none'}")
    lines += ["", "## Run", ""]
    lines += machine_md(res["machine"], res["command"], res["wall_s"], res.get("load"))
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_argument_group("modes")
    sub.add_argument("--measure-only", action="store_true", help="measure this CPU, write --out")
    sub.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    ap.add_argument("--label", default=None, help="name of this CPU in the results")
    ap.add_argument("--out", type=Path, default=None, help="--measure-only: JSON to write")
    ap.add_argument("--cpus", default="cortex-a72,cortex-a76", help="emulated CPUs, or 'none'")
    ap.add_argument("--rounds", type=int, default=5, help="emulated CPUs: rounds")
    ap.add_argument("--reps", type=int, default=2, help="emulated CPUs: runs per round")
    ap.add_argument("--host-rounds", type=int, default=15)
    ap.add_argument("--host-reps", type=int, default=20)
    ap.add_argument("--level0-blocks", default="32,64,128", help="block sizes run at level 0")
    ap.add_argument("--load", default=None, help="how loaded the machine was, for the report")
    args = ap.parse_args(argv)

    if args.measure_only:
        if args.out is None:
            ap.error("--measure-only needs --out")
        label = args.label or platform.machine()
        blocks0 = tuple(int(b) for b in args.level0_blocks.split(","))
        res = measure(label, args.rounds, args.reps, blocks0)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1) + "\n")
        print(f"{label}: {len(res['variants'])} variants in {res['wall_s']:.0f} s")
        return
    if args.report_only:
        res = json.loads(JSON_PATH.read_text())
        MD_PATH.write_text(report(res))
        print(f"wrote {MD_PATH}")
        return

    sys.path.insert(0, str(ROOT))
    from benchmarks.quantizer_error import SHARED_MACHINE, machine

    t0 = time.perf_counter()
    host = "x86-64 host" if platform.machine() == "x86_64" else platform.machine()
    runs = {host: measure(host, args.host_rounds, args.host_reps)}
    print(f"{host}: {runs[host]['wall_s']:.0f} s", flush=True)
    cpus = [] if args.cpus == "none" else [c for c in args.cpus.split(",") if c]
    if cpus:
        runs.update(_emulated(cpus, args.rounds, args.reps))
    res = {
        "summary": summarize(runs),
        "runs": runs,
        "machine": machine(),
        "command": "make bench-arm-paths",
        "wall_s": time.perf_counter() - t0,
        "load": args.load or SHARED_MACHINE,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    tmp = JSON_PATH.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(res, indent=1) + "\n")
    tmp.replace(JSON_PATH)
    MD_PATH.write_text(report(res))
    print(f"wrote {JSON_PATH} and {MD_PATH}")


if __name__ == "__main__":
    main()
