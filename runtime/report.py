"""A bundle's summary and Pareto table, for ``coalora inspect`` and ``coalora-run --dry-run``."""

from __future__ import annotations

from collections import Counter
from typing import Any

from coalora.runtime.format.pareto import ParetoSet
from coalora.runtime.format.reader import Bundle
from coalora.runtime.format.signing import signer_of
from coalora.runtime.format.spec import Arch, Key


def option_histogram(config: Any) -> str:
    """``"4b32x120, 8b32x90"``: how many matrices take each option (and ``", head 4b64"``
    where the configuration names its LM head's)."""
    counts = Counter(opt.name for opt in config.values())
    text = ", ".join(f"{k}x{v}" for k, v in sorted(counts.items()))
    head = getattr(config, "head", None)
    return text if head is None else f"{text}, head {head.name}"


def bundle_summary(bundle: Bundle, *, signature_checked: bool = False) -> dict[str, Any]:
    """``signature_checked``: the caller verified the signature against a trusted key."""
    arch = bundle.architecture
    signer = signer_of(bundle.root)
    pareto = ParetoSet.from_dict(bundle.pareto_dict(), bundle.space)
    cfg = arch.get(Arch.CONFIG, {})
    return {
        "path": str(bundle.root),
        "format_version": bundle.format_version,
        "producer": bundle.producer,
        "family": bundle.family,
        "task": arch.get(Arch.TASK),
        "layers": cfg.get("num_hidden_layers"),
        "hidden_size": cfg.get("hidden_size"),
        "vocab_size": cfg.get("vocab_size"),
        "labels": bundle.labels,
        "lm_head": bundle.lm_head,
        "quantized_matrices": len(bundle.space.matrices),
        "quantized_params": bundle.space.total_params,
        "options_shipped": [o.name for o in bundle.space.options],
        "lora": bundle.manifest[Key.LORA],
        "size_on_disk_bytes": bundle.size_on_disk(),
        "signed_by": None
        if signer is None
        else {
            "key_fingerprint": signer.key_fingerprint,
            "method": signer.method,
            "verified": signature_checked,
        },
        "metric": pareto.metric_name,
        "higher_is_better": pareto.higher_is_better,
        "pareto": [
            {
                "bits": e.bits,
                "nbytes": e.nbytes,
                "metric": e.metric,
                "seen_in_training": e.seen_in_training,
                "options": option_histogram(e.config),
            }
            for e in sorted(pareto.entries, key=lambda e: e.bits)
        ],
    }


def print_summary(summary: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    mb = summary["size_on_disk_bytes"] / 1e6
    console.print(
        f"[bold]{summary['path']}[/bold]  format v{summary['format_version']}, "
        f"{summary['family']} {summary['task']}, {summary['layers']} layers, "
        f"hidden {summary['hidden_size']}, {mb:.1f} MB on disk"
    )
    lora = summary["lora"]
    console.print(
        f"{summary['quantized_matrices']} quantized matrices "
        f"({summary['quantized_params'] / 1e6:.1f}M weights), options "
        f"{', '.join(summary['options_shipped'])}; LoRA rank {lora['rank']}, alpha {lora['alpha']}"
        + (f" (+{lora['low_rank']} at {lora['low_bits']} bits)" if lora.get("low_rank") else "")
        + (f"; LM head {summary['lm_head']}" if summary.get("lm_head") else "")
    )
    signer = summary.get("signed_by")
    if signer is None:
        console.print("signature: unsigned")
    else:
        checked = "verified" if signer["verified"] else "not checked (pass --trusted-key)"
        console.print(
            f"signature: sha256:{signer['key_fingerprint']} ({signer['method']}), {checked}",
            highlight=False,
            soft_wrap=True,  # one line, so the fingerprint can be compared or grepped
        )
    arrow = "higher is better" if summary["higher_is_better"] else "lower is better"
    table = Table(title=f"Pareto set: {summary['metric']} ({arrow})")
    for col in ("bits", "weights MB", summary["metric"], "seen in training", "options"):
        table.add_column(col, justify="right" if col != "options" else "left")
    for e in summary["pareto"]:
        table.add_row(
            f"{e['bits']:.3f}",
            f"{e['nbytes'] / 1e6:.1f}",
            f"{e['metric']:.4g}",
            "yes" if e["seen_in_training"] else "no",
            e["options"],
        )
    console.print(table)
