"""Everything opening a bundle checks, for every stored configuration, short of building a
session: what ``coalora inspect --verify`` runs.

Hashes only say a file is the one the manifest lists; a rehashed file can still be unusable.
So this also reads what the device would read: the manifest against its schema (done by
``Bundle.open``), every tensor's dtype, shape and extent, θ's signature and a finite
adjustment for every stored configuration, the folded adapters, the architecture the graph
builders take, and the tokenizer.
"""

from __future__ import annotations

from pathlib import Path

from coalora.runtime import assemble
from coalora.runtime.adapter import ThetaError, ThetaRunner, generate_adapters
from coalora.runtime.format.pareto import ParetoError, ParetoSet
from coalora.runtime.format.reader import Bundle, BundleError
from coalora.runtime.format.spec import BASE_FILE, THETA_FILE
from coalora.runtime.format.theta import ThetaVocab


def verify_bundle(path: str | Path) -> Bundle:
    """Open ``path`` hashing every file, then check everything a device would use; raises
    ``BundleError`` with one line naming the first problem."""
    bundle = Bundle.open(path, verify="all")
    root = bundle.root
    try:
        pareto = ParetoSet.from_dict(bundle.pareto_dict(), bundle.space)
    except ParetoError as exc:
        raise BundleError(f"{root}: {exc}") from None
    assemble.arch_of(bundle)
    mapped = assemble.MappedBundle(bundle)
    mapped.file(BASE_FILE)
    lora_a, lora_b = mapped.lora()
    names = [m.name for m in bundle.space.matrices]
    try:
        theta = ThetaRunner(
            str(bundle.theta_path()), bundle.theta_inputs, threads=1, rank=bundle.lora_rank
        )
        vocab = ThetaVocab.from_dict(bundle.theta_vocab)
        for entry in pareto.entries:
            mapped.linears(entry.config)
            arrays = vocab.encode(entry.config, bundle.space)
            generate_adapters(theta, arrays, names, lora_a, lora_b, bundle.lora_scale)
    except ThetaError as exc:
        raise BundleError(f"{root}: {THETA_FILE}: {exc}") from None
    except (KeyError, TypeError, ValueError) as exc:
        if isinstance(exc, BundleError):
            raise
        raise BundleError(f"{root}: θ vocabulary: {exc}") from None
    tokenizer = bundle.tokenizer_path()
    if tokenizer is not None:
        from tokenizers import Tokenizer

        try:
            Tokenizer.from_file(str(tokenizer))
        except Exception as exc:  # tokenizers raises its own exception type
            raise BundleError(f"{root}: tokenizer.json: {exc}") from None
    return bundle
