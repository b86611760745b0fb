"""Pictures people would rather look at than read: metric against bits."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def plot_pareto(summary: dict[str, Any], out: str | Path, title: str | None = None) -> Path:
    """Scatter the stored Pareto set (seen vs unseen configurations) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for seen, marker, label in ((True, "o", "seen in training"), (False, "^", "never trained on")):
        pts = [(e["bits"], e["metric"]) for e in summary["pareto"] if e["seen_in_training"] == seen]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.scatter(xs, ys, marker=marker, label=label, zorder=3)
    pts = sorted((e["bits"], e["metric"]) for e in summary["pareto"])
    ax.plot([p[0] for p in pts], [p[1] for p in pts], color="0.6", lw=1, zorder=2)
    ax.set_xlabel("bits per weight (codes + scales + zero points, as the device holds them)")
    ax.set_ylabel(summary["metric"])
    values = [e["metric"] for e in summary["pareto"]]
    if summary["metric"] == "perplexity" and min(values) > 0 and max(values) / min(values) > 5:
        ax.set_yscale("log")  # perplexity spans orders of magnitude at low bits
    ax.set_title(title or f"{summary['family']} {summary['task']}: stored configurations")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out)
    plt.close(fig)
    return out
