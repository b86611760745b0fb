"""Slim a bundle for a device class: keep the Pareto entries up to ``max_bits`` and ship only
the (matrix, option) pairs they use. Works from the bundle alone (no model, no torch)."""

from __future__ import annotations

from pathlib import Path

from coalora.export.bundle import BundleContents, write_bundle
from coalora.kernels import QuantOption
from coalora.kernels.matmulnbits import MatMulNBitsWeights
from coalora.runtime.bundle import Bundle
from coalora.runtime.selection import ParetoSet


class SlimError(ValueError):
    """Nothing would be left, or the request makes no sense."""


def slim_bundle(
    src: str | Path, dst: str | Path, max_bits: float, *, overwrite: bool = False
) -> Path:
    bundle = Bundle.open(src, verify="all")
    pareto = ParetoSet.from_dict(bundle.pareto_dict(), bundle.space)
    kept = [e for e in pareto.entries if e.bits <= max_bits]
    if not kept:
        smallest = min(e.bits for e in pareto.entries)
        raise SlimError(
            f"no stored configuration fits {max_bits:g} bits (the smallest needs {smallest:.2f})"
        )
    quantized: dict[QuantOption, dict[str, MatMulNBitsWeights]] = {}
    for entry in kept:
        for name, w in bundle.quantized(entry.config).items():
            quantized.setdefault(entry.config[name], {})[name] = w
    lora = bundle.lora_tensors()
    names = [m.name for m in bundle.space.matrices]
    manifest = bundle.manifest
    known = {"format", "format_version", "producer", "architecture", "space", "shipped", "lora"}
    known |= {"theta", "files"}
    contents = BundleContents(
        architecture=manifest["architecture"],
        space=bundle.space,
        quantized=quantized,
        base=bundle.base_tensors(),
        lora_a={n: lora[f"{n}.A"] for n in names},
        lora_b={n: lora[f"{n}.B"] for n in names},
        lora_rank=bundle.lora_rank,
        lora_alpha=float(manifest["lora"]["alpha"]),
        theta_onnx=bundle.theta_path().read_bytes(),
        theta_vocab=manifest["theta"]["vocab"],
        pareto=ParetoSet(kept, pareto.metric_name, pareto.higher_is_better).to_dict(),
        tokenizer_json=bundle.tokenizer_path(),
        theta_inputs=tuple(manifest["theta"]["inputs"]),
        extra={k: v for k, v in manifest.items() if k not in known}
        | {
            "slimmed": {
                "from_options": [o.name for o in bundle.space.options],
                "max_bits": max_bits,
            }
        },
    )
    return write_bundle(dst, contents, overwrite=overwrite)
