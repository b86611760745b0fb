"""The workstation CLI, ``coalora``.

    coalora quantize-report MODEL [--budgets 2.5,3,4,5] [--calib-texts N] [--json]

Commands are registered on ``app`` (a group, so further commands and sub-apps attach with
``app.command`` / ``app.add_typer``). torch and transformers are imported inside commands so
that ``coalora --help`` stays fast. User errors print one line to stderr and exit with 2.
"""

from __future__ import annotations

import json
import math
import time
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="coalora",
    help="Export quantized models whose LoRA adapter every device generates for its own budget.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

USAGE_ERROR = 2


def fail(message: str) -> typer.Exit:
    """Print ``error: message`` on one line of stderr; raise the returned Exit(2)."""
    typer.echo(f"error: {' '.join(message.split())}", err=True)
    return typer.Exit(USAGE_ERROR)


@app.callback()
def _root() -> None:
    """Workstation side of coalora: load, calibrate, allocate bits, export bundles."""


def parse_budgets(text: str) -> list[float]:
    """``"2.5,3,4bits"`` -> [2.5, 3.0, 4.0] (bits per weight, positive, finite)."""
    budgets: list[float] = []
    for part in text.split(","):
        item = part.strip().lower().removesuffix("bits").removesuffix("b").strip()
        if not item:
            continue
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"cannot read budget {part.strip()!r}: expected e.g. 3.5") from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"budget {part.strip()!r} must be a positive number of bits")
        budgets.append(value)
    if not budgets:
        raise ValueError("no budgets given: expected e.g. --budgets 2.5,3,4")
    return budgets


def _report(model: str, budgets: list[float], calib_texts: int, max_length: int) -> dict[str, Any]:
    from coalora.export.allocation import (
        allocate,
        check_budget,
        configuration_cost,
        cost_table,
        option_histogram,
    )
    from coalora.export.calibration import activation_second_moments, calibration_texts
    from coalora.export.models import config_space, linear_weights, load_model

    start = time.perf_counter()
    loaded = load_model(model)
    space = config_space(loaded.model)
    for budget in budgets:  # fail before the slow part
        check_budget(space, budget)
    texts = calibration_texts(calib_texts)
    moments = activation_second_moments(loaded, texts, max_length=max_length)
    weights = linear_weights(loaded.model)
    search = cost_table(weights, moments, space.options, method="search")
    rtn = cost_table(weights, moments, space.options, method="rtn")
    options = []
    for opt in space.options:
        s, r = search.uniform_total(opt), rtn.uniform_total(opt)
        options.append(
            {
                "option": opt.name,
                "bits": space.bits(space.uniform(opt)),
                "rtn_error": r,
                "search_error": s,
                "ratio": s / r if r > 0 else 1.0,
            }
        )
    allocations = []
    for budget in budgets:
        cfg = allocate(space, search, budget)
        allocations.append(
            {
                "budget": budget,
                "bits": space.bits(cfg),
                "weighted_error": configuration_cost(space, search, cfg),
                "histogram": option_histogram(cfg),
            }
        )
    return {
        "model": loaded.source,
        "kind": loaded.kind,
        "matrices": len(space),
        "quantized_params": space.total_params,
        "calibration": {"texts": len(texts), "max_length": max_length, "corpus": "BBC News"},
        "options": options,
        "allocations": allocations,
        "seconds": time.perf_counter() - start,
    }


def _print_report(data: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    cal = data["calibration"]
    console.print(
        f"[bold]{data['model']}[/] ({data['kind']}): {data['matrices']} matrices, "
        f"{data['quantized_params']:,} quantized weights; calibration: {cal['texts']} "
        f"{cal['corpus']} texts x {cal['max_length']} tokens"
    )
    per_option = Table(
        title=escape("Weighted error per option, summed over matrices: sum_k E[x_k^2] ||dW_k||^2")
    )
    for col in ("option", "bits/weight", "round-to-nearest", "search", "search / rtn"):
        per_option.add_column(col, justify="right")
    for row in data["options"]:
        per_option.add_row(
            row["option"],
            f"{row['bits']:.3f}",
            f"{row['rtn_error']:.4g}",
            f"{row['search_error']:.4g}",
            f"{row['ratio']:.3f}",
        )
    console.print(per_option)
    alloc = Table(title="Optimal allocation (MILP, search quantizer)")
    for col in ("budget", "bits achieved", "weighted error", "options"):
        alloc.add_column(col, justify="right" if col != "options" else "left")
    for row in data["allocations"]:
        hist = ", ".join(f"{k}x{v}" for k, v in row["histogram"].items())
        alloc.add_row(
            f"{row['budget']:g}", f"{row['bits']:.4f}", f"{row['weighted_error']:.4g}", hist
        )
    console.print(alloc)
    console.print(f"done in {data['seconds']:.1f} s")


@app.command("quantize-report")
def quantize_report(
    model: Annotated[
        str, typer.Argument(help="'smollm2', 'minilm', a .gguf file or a local HF model folder.")
    ],
    budgets: Annotated[
        str, typer.Option(help="Comma-separated budgets in bits per weight.")
    ] = "2.5,3,4,5",
    calib_texts: Annotated[
        int, typer.Option(help="BBC News articles used for calibration statistics.")
    ] = 64,
    max_length: Annotated[int, typer.Option(help="Tokens per calibration text.")] = 256,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Per-option quantization error (search vs round-to-nearest) and optimal allocations.

    Errors are weighted by calibration activations E[x_k^2] from BBC News text.
    """
    from coalora.export.allocation import BudgetError
    from coalora.export.calibration import CalibrationError
    from coalora.export.models import ModelLoadError

    try:
        budget_list = parse_budgets(budgets)
        if calib_texts < 1 or max_length < 1:
            raise ValueError("--calib-texts and --max-length must be positive")
        data = _report(model, budget_list, calib_texts, max_length)
    except (ModelLoadError, BudgetError, CalibrationError, ValueError) as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(data, indent=2))
    else:
        _print_report(data)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
