"""``coalora eval BUNDLE --data ...``: perplexity or accuracy per stored configuration, on this
device, beside the figures the bundle stores (runtime/evaluate.py)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from coalora.runtime.serve.cli import bad_input

EVAL_EXAMPLES = """
Examples:

  coalora eval bundle/ --data bbc --configs 3,4.5,6

  coalora eval bundle/ --data my-held-out.jsonl --configs all --json --plot eval.png
"""


def eval_command(
    bundle: Annotated[str, typer.Argument(help="bundle directory", show_default=False)],
    data: Annotated[
        str,
        typer.Option(
            help="'bbc', a .jsonl file or a folder (as 'coalora export train --data' takes)"
        ),
    ],
    configs: Annotated[
        str,
        typer.Option(
            help="'all' stored configurations, or bits budgets (e.g. 3,4.5): the configuration "
            "a device picks at each"
        ),
    ] = "all",
    blocks: Annotated[
        str,
        typer.Option(
            help="on the bundle's own data: 'stored' measures the held-out blocks its figures "
            "came from, 'all' every held-out block"
        ),
    ] = "stored",
    seq_len: Annotated[
        int | None,
        typer.Option(help="tokens per block (LM) or per example (classify) [the export's]", min=2),
    ] = None,
    context: Annotated[int, typer.Option(help="context length in tokens", min=2)] = 512,
    threads: Annotated[
        int | None, typer.Option(help="intra-op threads (default: physical cores)", min=1)
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    plot: Annotated[
        str | None, typer.Option(help="write a PNG of the metric against bits (needs matplotlib)")
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="no progress bar")] = False,
) -> None:
    """Measure BUNDLE's stored configurations on held-out data, on this device: teacher-forced
    perplexity (causal LMs, one pass per block) or accuracy (classifiers), beside the
    figures the bundle stores from the workstation."""
    from coalora.runtime import evaluate as ev
    from coalora.runtime.budget import BudgetError
    from coalora.runtime.data import DataError
    from coalora.runtime.engine import Runtime, RuntimeInputError
    from coalora.runtime.format.reader import BundleError
    from coalora.runtime.selection import SelectionError

    if blocks not in ("stored", "all"):
        raise bad_input(f"--blocks must be 'stored' or 'all', got {blocks!r}")
    if plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise bad_input("--plot needs matplotlib: pip install matplotlib") from None
    try:
        rt = Runtime.open(
            bundle,
            budget="32bits",
            context_length=context,
            threads=threads,
            build=False,
            all_logits=True,
        )
        entries = ev.choose_configs(rt, configs)
        held = ev.held_out(rt, data, seq_len=seq_len, blocks=blocks)
        results = ev.evaluate(rt, entries, held, progress=not quiet)
    except (
        BudgetError,
        BundleError,
        DataError,
        SelectionError,
        RuntimeInputError,
        ev.EvalError,
    ) as exc:
        raise bad_input(str(exc)) from None
    out = ev.report(rt, held, results)
    rt.close()
    if as_json:
        typer.echo(json.dumps(out, indent=1))
    else:
        ev.print_report(out)
    if plot is not None:
        try:
            path = ev.plot(out, plot)
        except OSError as exc:
            raise bad_input(f"cannot write {plot}: {exc}") from None
        typer.echo(f"plot: {path}", err=as_json)
