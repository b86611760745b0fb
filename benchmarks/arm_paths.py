"""Which MatMulNBits path each quantization option takes on a CPU, and what it costs.

One decode step of one SmolLM2-135M layer's matrices (fused q/k/v 576->960, o 576->576,
fused gate/up 576->3072, down 1536->576; one token, one thread) for every option (bits
{2, 4, 8} x blocks {32, 64, 128}) at accuracy levels 4 (int8 activations, what the runtime
serves) and 0 (fp32), plus candidate fast forms of an 8-bit matrix: symmetric (no zero
points), split into two 4-bit nibble planes (the same dequantized weights), and dequantized
once to an fp32 MatMul.

Three things are recorded per variant:

- the path, told directly: the codes are handed to the session in place
  (``add_initializer``) and overwritten after the first run. A packed kernel has its own copy
  and gives the same outputs; the unpacked path (``ComputeBUnpacked``: the whole matrix
  dequantized to fp32 on every call, then sgemm) reads them again and does not;
- the arithmetic: relative error against numpy, ~5e-3 with int8 activations, ~1e-7 in fp32;
- the cost: variants run in interleaved rounds in one process (a round keeps the fastest of
  a few runs of each); a figure is the median over rounds of the variant's time divided by
  4-bit's at the same block size and level in the same round.

    python -m benchmarks.arm_paths                 # this host + emulated cortex-a72 and a76
    python -m benchmarks.arm_paths --cpus none     # this host only (no root needed)
    python -m benchmarks.arm_paths --report-only   # rewrite the .md from the .json

The emulated CPUs run through ``scripts/smoke_arm64.sh --measure`` (root, qemu-user; see
docs/arm64-smoke.md): the same file runs inside the arm64 rootfs with the device install
(numpy, onnx, onnxruntime), so this module's measuring half imports nothing else. Under
qemu's TCG the path is exact but the cost ratios are not a board's: NEON kernels are
emulated far more slowly than scalar code, which hides most of what the unpacked path costs.
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
RESULTS = ROOT / "benchmarks" / "results"  # benchmarks.common.RESULTS, without importing it:
# this module also runs inside the emulated rootfs, where only the runtime is installed
JSON_PATH = RESULTS / "arm_paths.json"
MD_PATH = RESULTS / "arm_paths.md"

# SmolLM2-135M: hidden 576, 9 query / 3 kv heads of 64, intermediate 1536 (the runtime fuses
# q/k/v and gate/up into one node each).
LAYER = (("qkv", 576, 960), ("o", 576, 576), ("gate_up", 576, 3072), ("down", 1536, 576))
BITS = (2, 4, 8)
BLOCKS = (32, 64, 128)
LEVELS = (4, 0)
INT8_ERROR = 1e-4  # relative error above this: activations were quantized to int8


def variant_names(
    blocks: tuple[int, ...] = BLOCKS, level0_blocks: tuple[int, ...] = BLOCKS
) -> list[str]:
    """Every option at level 4; at level 0 the ``level0_blocks`` (emulation: block 32 only,
    its dequantize-every-call variants cost seconds a run)."""
    names = [f"{b}b{g}@4" for g in blocks for b in BITS]
    names += [f"{b}b{g}@0" for g in level0_blocks for b in BITS]
    names += [f"8b{g}sym@4" for g in blocks]
    names += [f"8b{g}split@4" for g in blocks]
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


def _nibble_planes(w: dict, k: int, n: int, block: int) -> list[tuple[dict, int, str]]:
    """An 8-bit matrix as two 4-bit ones with the same dequantized weights: a code
    q = 16 h + l and its zero point z = 16 zh + zl give (q - z) s = (h - zh) 16 s + (l - zl) s.
    Same bytes for codes and zero points, twice the scales."""
    q, z = w["b"], w["zp"]  # 8-bit: one byte per code / per block
    nb = -(-k // block)

    def pack(v: np.ndarray) -> np.ndarray:  # pairs of 4-bit values, low first
        return (v[..., 0::2] | (v[..., 1::2] << 4)).astype(np.uint8)

    zr = z.reshape(n, nb)
    zr = np.concatenate([zr, np.zeros((n, nb % 2), dtype=np.uint8)], axis=1)
    hi = {"b": pack(q >> 4), "scales": w["scales"] * 16, "zp": pack(zr >> 4).reshape(-1)}
    lo = {"b": pack(q & 15), "scales": w["scales"].copy(), "zp": pack(zr & 15).reshape(-1)}
    return [(hi, 4, ".hi"), (lo, 4, ".lo")]


def build(variant: str, seed: int = 0) -> tuple[bytes, dict[str, np.ndarray], dict, dict]:
    """A graph of one layer's matrices at ``variant``: the model, its inputs, the numpy
    reference outputs, and the MatMulNBits code tensors (to hand over in place)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    inputs = {f"x{k}": rng.standard_normal((1, k)).astype(np.float32) for k in (576, 1536)}
    nodes, inits, outs, ref, codes = [], [], [], {}, {}
    for name, k, n in LAYER:
        x = f"x{k}"
        if variant == "fp32":
            wf = rng.standard_normal((n, k)).astype(np.float32) * 0.02
            inits.append(numpy_helper.from_array(np.ascontiguousarray(wf.T), f"{name}.w"))
            nodes.append(helper.make_node("MatMul", [x, f"{name}.w"], [name]))
        else:
            opt, level = variant.split("@")
            kind = "sym" if opt.endswith("sym") else "split" if opt.endswith("split") else ""
            bits, block = (int(v) for v in opt.removesuffix(kind).split("b"))
            w = _weights(rng, k, n, bits, block, zp=kind != "sym")
            wf = _dequant(w, k, n, bits, block)
            parts = _nibble_planes(w, k, n, block) if kind == "split" else [(w, bits, "")]
            for pw, pbits, suffix in parts:
                names = [f"{name}{suffix}.q", f"{name}{suffix}.s"]
                inits.append(numpy_helper.from_array(pw["b"], names[0]))
                codes[names[0]] = pw["b"]
                inits.append(numpy_helper.from_array(pw["scales"], names[1]))
                if pw["zp"] is not None:
                    names.append(f"{name}{suffix}.z")
                    inits.append(numpy_helper.from_array(pw["zp"], names[2]))
                nodes.append(
                    helper.make_node(
                        "MatMulNBits",
                        [x, *names],
                        [name + suffix],
                        domain="com.microsoft",
                        K=k,
                        N=n,
                        bits=pbits,
                        block_size=block,
                        accuracy_level=int(level),
                    )
                )
            if kind == "split":
                nodes.append(helper.make_node("Add", [f"{name}.hi", f"{name}.lo"], [name]))
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
    return model.SerializeToString(), inputs, ref, codes


def _session(model: bytes, in_place: dict[str, np.ndarray] | None = None) -> Any:
    """One-thread session; ``in_place`` initializers are handed over without a copy."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    keep = []
    for name, arr in (in_place or {}).items():
        keep.append(ort.OrtValue.ortvalue_from_numpy(arr))
        so.add_initializer(name, keep[-1])
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    sess._coalora_keep = keep  # the OrtValues must outlive the session
    return sess


def _hwcap() -> dict[str, bool]:
    """The arm64 HWCAP bits that decide MLAS' kernels (empty elsewhere)."""
    if platform.machine() not in ("aarch64", "arm64"):
        return {}
    import ctypes

    libc = ctypes.CDLL(None)
    libc.getauxval.restype = ctypes.c_ulong
    hw, hw2 = libc.getauxval(16), libc.getauxval(26)
    return {"asimddp": bool(hw >> 20 & 1), "i8mm": bool(hw2 >> 13 & 1)}


def measure(
    label: str,
    rounds: int,
    reps: int,
    level0_blocks: tuple[int, ...] = BLOCKS,
    names: list[str] | None = None,
) -> dict:
    """Time every variant (or ``names``, which must include their 4-bit references and 4b32@4) in
    interleaved rounds on this CPU; one thread."""
    import onnxruntime as ort

    t_start = time.perf_counter()
    names = names or variant_names(BLOCKS, level0_blocks)
    sessions, feeds, errors, build_s, reads = {}, {}, {}, {}, {}
    for v in names:
        model, inputs, ref, codes = build(v)
        t0 = time.perf_counter()
        sess = _session(model, codes)
        build_s[v] = time.perf_counter() - t0
        got = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, inputs), strict=True))
        errors[v] = max(
            float(np.abs(got[k] - r).max() / (np.abs(r).max() + 1e-30)) for k, r in ref.items()
        )
        # The path, told directly: overwrite the codes the session was handed. A prepacked
        # kernel has its own copy and gives the same outputs; the unpacked path reads (and
        # dequantizes) them again on every call.
        for arr in codes.values():
            arr[...] = 0
        again = sess.run(None, inputs)
        reads[v] = bool(codes) and any(
            not np.array_equal(a, got[o.name])
            for a, o in zip(again, sess.get_outputs(), strict=True)
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
            ref_name = f"4b{opt.removesuffix('sym').removesuffix('split').split('b')[1]}@{level}"
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
            # the codes are read on every call: the dequantize-every-call path
            "unpacked": reads[v],
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


def _standard(v: str) -> bool:
    """A shipped option at level 4 (not a fast-form candidate)."""
    return v.endswith("@4") and v[:-2].rstrip("0123456789b") == ""


def summarize(runs: dict[str, dict]) -> dict[str, Any]:
    """Per CPU: every variant's cost relative to 4-bit, its path, and the shipped options
    that take the unpacked (dequantize every call) path at level 4."""
    return {
        "relative_to_4bit": {
            cpu: {v: round(d["vs_4bit"], 2) for v, d in run["variants"].items()}
            for cpu, run in runs.items()
        },
        "unpacked": {
            cpu: {v: d["unpacked"] for v, d in run["variants"].items()} for cpu, run in runs.items()
        },
        "slow_at_level4": {
            cpu: sorted(v for v, d in run["variants"].items() if _standard(v) and d["unpacked"])
            for cpu, run in runs.items()
        },
        "compute": {
            cpu: {v: d["compute"] for v, d in run["variants"].items()} for cpu, run in runs.items()
        },
    }


# What onnxruntime's source says (read from the public microsoft/onnxruntime repository; the
# stored copies are of recent main-branch commits, not the v1.32.0 tag, whose snapshot was too
# large to fetch: the measurement above is what tells 1.32.0 apart).
MLAS_DISPATCH = """\
## Why: the MatMulNBits dispatch in onnxruntime's source

- `onnxruntime/contrib_ops/cpu/quantization/matmul_nbits.cc`, `GetComputeType`: at
  `accuracy_level` 4 the kernel asks `MlasIsQNBitGemmAvailable(bits, block, SQNBIT_CompInt8)`;
  if MLAS has no int8 kernel for those bits on this CPU, or at any other level, the compute
  type is `SQNBIT_CompFp32`. `PrePack` packs B only when `MlasIsQNBitGemmAvailable(bits, block,
  compute_type)` holds. `Compute` runs `ComputeBPacked` (`MlasQNBitGemmBatch`) when B was
  packed, otherwise `ComputeBUnpacked`: `MlasDequantizeBlockwise<float, bits>` of the whole
  K x N matrix into a temporary fp32 buffer, then `MlasGemmBatch` (sgemm), on every call (the
  source carries `TODO(fajin): move B dequant to prepack`).
- `onnxruntime/core/mlas/lib/qnbitgemm.cpp`, `GetQNBitGemmVariant` /
  `MlasIsQNBitGemmAvailable`: the only fp32-compute variant is 4-bit
  (`SQ4BitGemmVariant_CompFp32`, needs `SQ4BitGemmM1Kernel_CompFp32` and
  `SQ4BitBlkDequantBForSgemm_CompFp32`); 8-bit has only `SQ8BitGemmVariant_CompInt8` (needs
  `SQ8BitGemmKernel_BlkSum_CompInt8`), 2-bit only an int8 variant (`SQ2BitGemmKernel_BlkSum_
  CompInt8`, in the newer copies). So at level 0, 2- and 8-bit always take `ComputeBUnpacked`.
- `onnxruntime/core/mlas/lib/platform.cpp` (arm64): `QNBitGemmDispatch =
  &GetMlasQNBitGemmDispatchNeon(HasDotProductInstructions, HasI8MMInstructions)`, the flags
  from `MLAS_CPUIDINFO` (HWCAP `asimddp`, `i8mm` on Linux).
  `onnxruntime/core/mlas/lib/qnbitgemm_kernel_neon.cpp`, `GetMlasQNBitGemmDispatchNeon`:
  always sets the 4-bit fp32 kernels (`SQ4BitGemmM1Kernel_CompFp32`,
  `SQ4BitBlkDequantBForSgemm_CompFp32`); only `if (InitializeWithDotSupport)` sets
  `SQ4BitGemmKernel_CompInt8`, `QuantizeARow_CompInt8`,
  `SQ8BitGemmKernel_BlkSum_CompInt8<true>` and, in the newer copy, the 2-bit
  `SQ2BitGemmKernel_BlkSum_CompInt8_NeonDotProd` (`if (InitializeWithDotSupport ||
  InitializeWithI8MMSupport)`). Without dot product (Cortex-A72) therefore: 4-bit at level 4
  falls back to the packed fp32 kernel (fast, fp32 accuracy), 2- and 8-bit to
  `ComputeBUnpacked`. With dot product (Cortex-A76): int8 kernels for 4 and 8 bits, and for 2
  bits where the build has the W2 NEON kernel.
- x86 (`sqnbitgemm_kernel_avx2.cpp`, `..._avx512vnni.cpp`, `MlasSQNBitGemmDispatchAvx2vnni`
  etc.): int8 kernels for 4 and 8 bits (`SQ4BitGemmKernel_BlkSum_CompInt8_avx2vnni`,
  `SQ8BitGemmKernel_BlkSum_CompInt8_avx2vnni`) and, in the newer copies, 2 bits
  (`SQ2BitGemmKernel_BlkSum_CompInt8_Avx2Vnni_Dispatch`); fp32 compute only for 4 bits.
"""


def report(res: dict[str, Any]) -> str:
    sys.path.insert(0, str(ROOT))
    from benchmarks.common import machine_md

    runs = res["runs"]
    cpus = list(runs)
    host = runs[cpus[0]]["variants"]
    deq = [d["vs_4bit"] for v, d in host.items() if v.endswith("@0") and d["unpacked"]]
    native_deq = f"{min(deq):.0f}-{max(deq):.0f}x" if deq else "(not measured)"
    x86_fp32 = f"{host['fp32']['vs_4b32_level4']:.2f}x"
    arm = [runs[c]["variants"]["fp32"]["vs_4b32_level4"] for c in cpus[1:]]
    arm_fp32 = "/".join(f"{x:.2f}x" for x in arm) or "-"
    lines = [
        "# MatMulNBits path per option: x86 host, emulated Cortex-A72 (Pi 4), Cortex-A76 (Pi 5)",
        "",
        "One decode step (one token) of one SmolLM2-135M layer's matrices: fused q/k/v "
        "576->960, o 576->576, fused gate/up 576->3072, down 1536->576; random weights; "
        "onnxruntime, one thread. Each cell: the median over interleaved rounds (each the "
        "fastest of a few runs) of the option's time divided by 4-bit's at the same block "
        "size and accuracy level, in the same round (the `fp32` row: divided by 4b32 at "
        "level 4); then the path: **`DEQ`** = the codes are read again on every call (they "
        "were overwritten after the first run and the output changed), i.e. the whole matrix "
        "dequantized to fp32 and an sgemm on every call; otherwise a packed kernel, `int8` "
        f"(activations quantized to int8: relative error against numpy above {INT8_ERROR:g}) "
        "or `fp32` (error ~1e-7).",
        "",
        "The x86 column is native. The Arm columns are qemu-user (TCG) emulation: the path "
        "is exact, the cost ratios are not a board's. TCG distorts what kernels cost against "
        "each other: a plain fp32 MatMul runs at "
        f"{arm_fp32} the packed 4-bit kernel on the emulated "
        f"{'/'.join(cpus[1:]) or 'Arm CPUs'}, {x86_fp32} natively on x86; on the A72 the "
        "packed fp32 kernel it uses for 4 bits is emulated about as slowly as the unpacked "
        "path, which hides the difference there. What the unpacked path costs natively shows "
        "in the x86 level-0 rows, where 2 and 8 bits take it against 4-bit's packed fp32 "
        f"kernel: {native_deq}.",
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
            tag = "**DEQ**" if d["unpacked"] else d["compute"]
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
    lines += ["", "## Unpacked (dequantize every call) at accuracy level 4, the serving path", ""]
    for c in cpus:
        lines.append(f"- {c}: {', '.join(s['slow_at_level4'][c]) or 'none'}")
    lines += [
        "",
        "## Fast forms of an 8-bit matrix",
        "",
        "Bits per weight as the device holds them (block 32): 8b32 9.25 (codes, fp32 scale, "
        "8-bit zero point), `8b32sym` 9.0 (no zero points: MatMulNBits' default 128), "
        "`8b32split` 10.25 (the same matrix as two 4-bit MatMulNBits nodes whose outputs are "
        "added: a code q = 16h + l with zero point z = 16zh + zl gives (q - z)s = (h - zh)16s "
        "+ (l - zl)s, exactly the same dequantized weights; twice the scales), `fp32` 32 "
        "(dequantized once, plain MatMul). Cost relative to 4b32 at level 4:",
        "",
        "| CPU | 8b32 | 8b32sym | 8b32split | fp32 |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for c in cpus:
        v = runs[c]["variants"]
        cells = [v.get(k, {}).get("vs_4b32_level4") for k in ("8b32@4", "8b32sym@4")]
        cells += [v.get(k, {}).get("vs_4b32_level4") for k in ("8b32split@4", "fp32")]
        lines.append(
            f"| {c} | " + " | ".join("-" if x is None else f"{x:.2f}x" for x in cells) + " |"
        )
    lines += ["", "Which of them avoid the unpacked path (any block size):", ""]
    for c in cpus:
        v = runs[c]["variants"]
        forms = {"8-bit": "@4", "sym": "sym@4", "split": "split@4"}
        ok = [
            name
            for name, tail in forms.items()
            if all(
                not d["unpacked"]
                for k, d in v.items()
                if k.startswith("8b") and k.endswith(tail) and k[2 : -len(tail)].isdigit()
            )
        ]
        lines.append(f"- {c}: {', '.join(ok) or 'none'} (fp32 has nothing to unpack)")
    lines += [
        "",
        "On the A72 only the split form keeps 8-bit weights on a packed kernel, at 1 more bit "
        "per weight at block 32 (0.25 at 128); the runtime does not build it yet (it skips "
        "8-bit configurations there instead).",
    ]
    lines += ["", MLAS_DISPATCH, "## Run", ""]
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
    ap.add_argument("--host-rounds", type=int, default=11)
    ap.add_argument("--host-reps", type=int, default=10)
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
    if args.report_only:  # the summary is derived from the runs: recomputed too
        res = json.loads(JSON_PATH.read_text())
        res = {**res, "summary": summarize(res["runs"])}
        JSON_PATH.write_text(json.dumps(res, indent=1) + "\n")
        MD_PATH.write_text(report(res))
        print(f"wrote {MD_PATH}")
        return

    sys.path.insert(0, str(ROOT))
    from benchmarks.common import SHARED_MACHINE, machine

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
