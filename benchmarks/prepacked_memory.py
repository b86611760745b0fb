"""What MatMulNBits holds once it has prepacked a matrix, against the option's stored bytes.

Each row: one matrix of random codes, written to a safetensors file, mapped, and handed to a
one-node onnxruntime session as the runtime hands its weights (``runtime.session``, the
mapped pages dropped once built); the figure is the anonymous RSS the session keeps. Each
row runs in a fresh process. ``runtime/plan.py``'s ``PREPACKED_FACTOR`` takes each width's
largest ratio, rounded up.

    python -m benchmarks.prepacked_memory

writes benchmarks/results/prepacked_memory.md and .json.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import (
    ROOT,
    child_json,
    machine,
    proc_status,
    read_result,
    report_only_parser,
    write_result,
)

STEM = "prepacked_memory"
# (bits, block, N, K): SmolLM2 (576 / 1536), Gemma 3 (640 head) and Qwen2.5-0.5B (896) shapes
SHAPES = [
    (2, 32, 15360, 576),
    (2, 64, 15360, 1536),
    (2, 64, 48640, 896),
    (4, 32, 48640, 896),
    (4, 64, 15360, 576),
    (4, 64, 48640, 896),
    (4, 128, 15360, 576),
    (8, 32, 49152, 576),
    (8, 32, 151936, 896),
    (8, 64, 15360, 576),
    (8, 64, 48640, 896),
]


def child(bits: int, block: int, n: int, k: int) -> dict[str, Any]:
    import numpy as np
    from onnx import TensorProto, helper
    from safetensors.numpy import save_file

    from coalora.kernels.options import QuantOption
    from coalora.runtime.graphs._onnx import external_tensor
    from coalora.runtime.mapped import MappedSafetensors
    from coalora.runtime.session import create_session

    nb = -(-k // block)
    zero = 0x88 if bits == 4 else 1 << (bits - 1)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "w.safetensors"
        codes = np.random.default_rng(0).integers(0, 256, (n, nb, block * bits // 8), np.uint8)
        save_file(
            {
                "b": codes,
                "s": np.ones(n * nb, np.float32),
                "z": np.full(n * -(-nb * bits // 8), zero, np.uint8),
            },
            str(path),
        )
        del codes
        m = MappedSafetensors(path)
        arrays = {name: m[name] for name in m}
        node = helper.make_node(
            "MatMulNBits", ["x", "b", "s", "z"], ["y"], domain="com.microsoft",
            K=k, N=n, bits=bits, block_size=block, accuracy_level=4,
        )  # fmt: skip
        graph = helper.make_graph(
            [node], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, k])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
            [external_tensor(name, a) for name, a in arrays.items()],
        )  # fmt: skip
        proto = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)],
        )
        proto.ir_version = 10
        before = proc_status()["RssAnon"]
        built = create_session(proto, threads=1, initializers=arrays, release=m.release)
        m.release()
        built.session.run(None, {"x": np.ones((1, k), np.float32)})
        held = proc_status()["RssAnon"] - before
    stored = QuantOption(bits, block).nbytes(n, k)
    return {"option": f"{bits}b{block}", "N": n, "K": k, "stored_bytes": stored,
            "prepacked_bytes": held, "ratio": held / stored}  # fmt: skip


def summary(res: dict[str, Any]) -> dict[str, Any]:
    by_bits: dict[str, list[float]] = {}
    for r in res["rows"]:
        by_bits.setdefault(r["option"].split("b")[0], []).append(r["ratio"])
    return {
        "prepacked_over_stored": {
            b: {"min": round(min(v), 3), "max": round(max(v), 3)}
            for b, v in sorted(by_bits.items())
        }
    }


def render(res: dict[str, Any]) -> str:
    lines = [
        "# MatMulNBits' prepacked buffers against the stored bytes",
        "",
        f"Command: `{res['command']}`. Machine: {res['machine']['cpu']}, "
        f"onnxruntime {res['machine']['versions'].get('onnxruntime', '?')}, accuracy level 4.",
        "",
        "| option | N | K | stored MB | prepacked MB | ratio |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in res["rows"]:
        lines.append(
            f"| {r['option']} | {r['N']} | {r['K']} | {r['stored_bytes'] / 1e6:.2f} | "
            f"{r['prepacked_bytes'] / 1e6:.2f} | {r['ratio']:.3f} |"
        )
    lines += ["", "Per width (min / max ratio): " + "; ".join(
        f"{b}-bit {v['min']:.2f} / {v['max']:.2f}"
        for b, v in res["summary"]["prepacked_over_stored"].items()
    ) + "."]  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["--child"]:
        print(json.dumps(child(*(int(x) for x in args_in[1:5]))))
        return 0
    args = report_only_parser(__doc__).parse_args(args_in)
    if args.report_only:
        res = read_result(ROOT / "benchmarks" / "results" / f"{STEM}.json")
    else:
        rows = []
        for shape in SHAPES:
            rows.append(child_json("benchmarks.prepacked_memory", *map(str, shape)))
        res = {"rows": rows, "command": "python -m benchmarks.prepacked_memory",
               "machine": machine(("coalora", "numpy", "onnxruntime"))}  # fmt: skip
        res["summary"] = summary(res)
    text = render(res)
    write_result(STEM, res, text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
