"""Slim a bundle for a device class: keep the Pareto entries up to ``max_bits`` and ship only
the (matrix, option) pairs they use. Works from the bundle alone (no model, no torch)."""

from __future__ import annotations

from pathlib import Path

from coalora.kernels import QuantOption
from coalora.kernels.matmulnbits import MatMulNBitsWeights
from coalora.runtime import assemble
from coalora.runtime.format.pareto import ParetoSet
from coalora.runtime.format.spec import WRITER_SECTIONS, Key, Slimmed
from coalora.runtime.format.writer import BundleContents, write_bundle
from coalora.runtime.verify import verify_bundle


class SlimError(ValueError):
    """Nothing would be left, or the request makes no sense."""


def slim_bundle(
    src: str | Path,
    dst: str | Path,
    max_bits: float,
    *,
    overwrite: bool = False,
    sign_key: str | Path | None = None,
) -> Path:
    """The slimmed copy of ``src`` at ``dst`` (signed with ``sign_key`` when given: the
    source's signature covers other files and is not carried over)."""
    # Everything a device would check, so a damaged θ or tensor is not copied on silently.
    bundle = verify_bundle(src)
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
    # a configured head ships every option of the space (the space is carried over as it is)
    mapped = assemble.MappedBundle(bundle)
    arch = assemble.arch_of(bundle)
    heads = {
        o: assemble.head_at(mapped, arch, o)
        for o in bundle.space.head_options
        if o.name != bundle.lm_head
    }
    lora = bundle.lora_pairs()
    ranks = bundle.lora_ranks
    contents = BundleContents(
        architecture=bundle.architecture,
        space=bundle.space,
        quantized=quantized,
        base=bundle.base_tensors(),
        lora_a=lora.a,
        lora_b=lora.b,
        lora_rank=ranks.rank,
        lora_alpha=bundle.lora_alpha,
        lora_low_rank=ranks.low_rank,
        lora_low_bits=ranks.low_bits,
        lora_a_low=lora.a_low,
        lora_b_low=lora.b_low,
        theta_onnx=bundle.theta_path().read_bytes(),
        theta_vocab=bundle.theta_vocab,
        pareto=ParetoSet(kept, pareto.metric_name, pareto.higher_is_better).to_dict(),
        tokenizer_json=bundle.tokenizer_path(),
        theta_inputs=tuple(bundle.theta_inputs),
        extra={k: v for k, v in bundle.manifest.items() if k not in WRITER_SECTIONS}
        | {
            Key.SLIMMED: {
                Slimmed.FROM_OPTIONS: [o.name for o in bundle.space.options],
                Slimmed.MAX_BITS: max_bits,
            }
        },
        heads=heads,
    )
    return write_bundle(dst, contents, overwrite=overwrite, sign_key=sign_key)
