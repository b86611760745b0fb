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
from coalora.runtime.adapter import bundle_adapters, open_theta
from coalora.runtime.engine import load_tokenizer
from coalora.runtime.format.pareto import ParetoError, ParetoSet
from coalora.runtime.format.reader import Bundle, BundleError
from coalora.runtime.format.spec import BASE_FILE


def verify_bundle(path: str | Path) -> Bundle:
    """Open ``path`` hashing every file, then check everything a device would use; raises
    ``BundleError`` with one line naming the first problem."""
    bundle = Bundle.open(path, verify="all")
    root = bundle.root
    try:
        pareto = ParetoSet.from_dict(bundle.pareto_dict(), bundle.space)
    except ParetoError as exc:
        raise BundleError(f"{root}: {exc}") from None
    arch = assemble.arch_of(bundle)
    mapped = assemble.MappedBundle(bundle)
    mapped.file(BASE_FILE)
    lora = mapped.lora()
    theta = open_theta(bundle)
    for entry in pareto.entries:
        mapped.linears(entry.config)
        bundle_adapters(bundle, theta, lora, entry.config)
        if entry.config.head is not None:
            assemble.lm_head(mapped, arch, entry.config)  # its head's tensors and extent
    load_tokenizer(bundle)
    return bundle
