"""The workstation CLI, ``coalora``.

    coalora quantize-report MODEL [--budgets 2.5,3,4,5] [--calib-texts N] [--json]
    coalora export train MODEL --out BUNDLE [--data bbc|FILE.jsonl|DIR] [--fast] [--fresh] ...
    coalora serve BUNDLE / coalora eval BUNDLE --data ...   (device side: coalora.runtime)

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

from coalora.export.options import ExportOptions, cli_help, default_of, option_field
from coalora.runtime.eval_cli import EVAL_EXAMPLES, eval_command
from coalora.runtime.serve.cli import SERVE_EXAMPLES, serve_command

app = typer.Typer(
    name="coalora",
    help="Export quantized models whose LoRA adapter every device generates for its own budget.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

USAGE_ERROR = 2

# Device-side commands: their modules import only typer here, and the runtime (never torch)
# when they run, so they work on a runtime-only install.
app.command("serve", epilog=SERVE_EXAMPLES)(serve_command)
app.command("eval", epilog=EVAL_EXAMPLES)(eval_command)


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
        str,
        typer.Argument(help="'smollm2', 'gemma3', 'minilm', a .gguf file or a local HF folder."),
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

    Errors are weighted by calibration activations (second moments of each input column)
    from BBC News text.
    """
    from coalora.export.calibration import CalibrationError
    from coalora.export.models import ModelLoadError
    from coalora.runtime.budget import BudgetError

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


# -- coalora export ... ------------------------------------------------------------------------
export_app = typer.Typer(
    name="export",
    help="Train a model's configuration-aware adapter and write its bundle.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
app.add_typer(export_app, name="export")


def _train_help() -> str:
    """The train command's help, with the figures read off ``ExportOptions`` and ``PRESETS``."""

    def run(model: str, fast: bool = False) -> ExportOptions:
        return ExportOptions.for_model(model, "-", fast=fast)

    def shape(o: ExportOptions) -> str:
        return (
            f"{o.steps} steps, batch {o.batch_size}, {o.seq_len} tokens, search every "
            f"{o.steps_per_epoch} steps"
        )

    base, fast = run("-"), run("-", fast=True)
    return (
        "Fine-tune CoA-LoRA on MODEL and DATA and write one bundle every device serves from."
        "\n\n"
        "MODEL is 'smollm2' (SmolLM2-135M-Instruct, LLaMA, trained as a causal LM on the "
        f"data's text; defaults: {shape(run('smollm2'))}), 'minilm' (all-MiniLM-L6-v2, BERT, "
        f"trained as a topic classifier; defaults: {shape(run('minilm'))}), a .gguf file or a "
        f"Hugging Face model folder ({shape(base)}). All default to rank {base.rank}, alpha "
        f"{base.alpha:g}, lr {base.lr:g}, {base.configs_per_step} configurations per step and "
        "all nine options (2/4/8 bits x blocks 32/64/128)."
        "\n\n"
        f"--fast is the demo preset ({fast.steps} steps, batch {fast.batch_size}, "
        f"{fast.seq_len} tokens, {fast.limit} examples, options {'/'.join(fast.options)}, a "
        "coarse sweep): about 10-15 minutes for SmolLM2 on 2 cores, a short adapter rather "
        "than a tuned one. Explicit flags override any preset."
        "\n\n"
        "Slow work (calibration, cost table, checkpoint, sweep) is kept in --work-dir (default "
        ".cache/coalora/<model>-<hash of the options and data>) and reused by a second run "
        "with the same options; --fresh starts over."
    )


def _flag_help(name: str) -> str:
    # Escaped: rich would read "[bbc]" or "[auto]" as markup and drop it.
    return cli_help(name).replace("[", "\\[")


def _sweep_help() -> str:
    lo, hi, step = (default_of(n) for n in ("sweep_lo", "sweep_hi", "sweep_step"))
    return (
        "Sweep LO:HI:STEP in bits per weight, clipped to the model's range "
        f"\\[{lo:g}:{hi:g}:{step:g}]."
    )


@export_app.command("train", help=_train_help())
def export_train(
    model: Annotated[str, typer.Argument(help=option_field("model").metadata["help"])],
    out: Annotated[str, typer.Option("--out", "-o", help=option_field("out").metadata["help"])],
    data: Annotated[str | None, typer.Option(help=_flag_help("data"))] = None,
    task: Annotated[str | None, typer.Option(help=_flag_help("task"))] = None,
    steps: Annotated[int | None, typer.Option(help=_flag_help("steps"))] = None,
    batch_size: Annotated[int | None, typer.Option(help=_flag_help("batch_size"))] = None,
    seq_len: Annotated[int | None, typer.Option(help=_flag_help("seq_len"))] = None,
    rank: Annotated[int | None, typer.Option(help=_flag_help("rank"))] = None,
    alpha: Annotated[float | None, typer.Option(help=_flag_help("alpha"))] = None,
    lr: Annotated[float | None, typer.Option(help=_flag_help("lr"))] = None,
    configs_per_step: Annotated[
        int | None, typer.Option(help=_flag_help("configs_per_step"))
    ] = None,
    steps_per_epoch: Annotated[int | None, typer.Option(help=_flag_help("steps_per_epoch"))] = None,
    epochs: Annotated[
        int | None,
        typer.Option(
            "--epochs",
            help="Epochs over the run, a Pareto search between each two (sets --steps-per-epoch).",
        ),
    ] = None,
    eval_batches: Annotated[int | None, typer.Option(help=_flag_help("eval_batches"))] = None,
    sweep_batches: Annotated[int | None, typer.Option(help=_flag_help("sweep_batches"))] = None,
    val_fraction: Annotated[float | None, typer.Option(help=_flag_help("val_fraction"))] = None,
    seed: Annotated[int | None, typer.Option(help=_flag_help("seed"))] = None,
    calib_texts: Annotated[int | None, typer.Option(help=_flag_help("calib_texts"))] = None,
    options: Annotated[str | None, typer.Option(help=_flag_help("options"))] = None,
    quantizer: Annotated[str | None, typer.Option(help=_flag_help("quantizer"))] = None,
    cost_weights: Annotated[str | None, typer.Option(help=_flag_help("cost_weights"))] = None,
    search_rescore: Annotated[int | None, typer.Option(help=_flag_help("search_rescore"))] = None,
    sampler: Annotated[str | None, typer.Option(help=_flag_help("sampler"))] = None,
    lora_init: Annotated[str | None, typer.Option(help=_flag_help("lora_init"))] = None,
    distill_weight: Annotated[float | None, typer.Option(help=_flag_help("distill_weight"))] = None,
    theta_lr_scale: Annotated[float | None, typer.Option(help=_flag_help("theta_lr_scale"))] = None,
    theta_anchor: Annotated[str | None, typer.Option(help=_flag_help("theta_anchor"))] = None,
    low_bit_rank: Annotated[int | None, typer.Option(help=_flag_help("low_bit_rank"))] = None,
    chat_texts: Annotated[int | None, typer.Option(help=_flag_help("chat_texts"))] = None,
    chat_share: Annotated[float | None, typer.Option(help=_flag_help("chat_share"))] = None,
    train_range: Annotated[str | None, typer.Option(help=_flag_help("train_range"))] = None,
    budgets: Annotated[str | None, typer.Option(help=_sweep_help())] = None,
    random_configs: Annotated[int | None, typer.Option(help=_flag_help("sweep_random"))] = None,
    lm_head: Annotated[str | None, typer.Option(help=_flag_help("lm_head"))] = None,
    head_options: Annotated[str | None, typer.Option(help=_flag_help("head_options"))] = None,
    device_class: Annotated[str | None, typer.Option(help=_flag_help("device_class"))] = None,
    device: Annotated[str | None, typer.Option(help=_flag_help("device"))] = None,
    dtype: Annotated[str | None, typer.Option(help=_flag_help("dtype"))] = None,
    layerwise: Annotated[str | None, typer.Option(help=_flag_help("layerwise"))] = None,
    ray: Annotated[str | None, typer.Option(help=_flag_help("ray"))] = None,
    ray_workers: Annotated[int | None, typer.Option(help=_flag_help("ray_workers"))] = None,
    threads: Annotated[int | None, typer.Option(help=_flag_help("threads"))] = None,
    limit: Annotated[int | None, typer.Option(help=_flag_help("limit"))] = None,
    work_dir: Annotated[str | None, typer.Option(help=_flag_help("work_dir"))] = None,
    sign: Annotated[str | None, typer.Option(help=_flag_help("sign"))] = None,
    fast: Annotated[
        bool, typer.Option("--fast", help="Demo preset: minutes, not quality.")
    ] = False,
    fresh: Annotated[
        bool, typer.Option("--fresh", help=option_field("fresh").metadata["help"])
    ] = False,
    allow_pickle: Annotated[
        bool,
        typer.Option("--allow-pickle", help=option_field("allow_pickle").metadata["help"]),
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help=option_field("overwrite").metadata["help"])
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars or log.")] = False,
) -> None:
    import logging

    from coalora.export import distributed
    from coalora.export.pipeline import run_export

    try:
        overrides: dict[str, Any] = dict(
            data=data,
            task=task,
            steps=steps,
            batch_size=batch_size,
            seq_len=seq_len,
            rank=rank,
            alpha=alpha,
            lr=lr,
            configs_per_step=configs_per_step,
            steps_per_epoch=steps_per_epoch,
            eval_batches=eval_batches,
            sweep_batches=sweep_batches,
            val_fraction=val_fraction,
            seed=seed,
            calib_texts=calib_texts,
            quantizer=quantizer,
            cost_weights=cost_weights,
            search_rescore=search_rescore,
            sampler=sampler,
            lora_init=lora_init,
            distill_weight=distill_weight,
            theta_lr_scale=theta_lr_scale,
            theta_anchor=theta_anchor,
            low_bit_rank=low_bit_rank,
            chat_texts=chat_texts,
            chat_share=chat_share,
            train_range=train_range,
            sweep_random=random_configs,
            lm_head=lm_head,
            head_options=head_options,
            device_class=device_class,
            device=device,
            dtype=dtype,
            layerwise=layerwise,
            ray=ray,
            ray_workers=ray_workers,
            threads=threads,
            limit=limit,
            work_dir=work_dir,
            sign=sign,
        )
        if options is not None:
            overrides["options"] = tuple(o.strip() for o in options.split(",") if o.strip())
        if budgets is not None:
            overrides.update(_parse_sweep(budgets))
        opts = ExportOptions.for_model(
            model,
            out,
            fast=fast,
            fresh=fresh,
            overwrite=overwrite,
            progress=not quiet,
            allow_pickle=allow_pickle,
            **overrides,
        )
        if epochs is not None:
            if steps_per_epoch is not None:
                raise ValueError("give --epochs or --steps-per-epoch, not both")
            if epochs < 0:
                raise ValueError(f"--epochs must be >= 0, got {epochs}")
            opts.steps_per_epoch = max(1, opts.steps // epochs) if epochs else 0
        speaks = distributed.launched_rank() == 0  # under torchrun, rank 0 speaks for all
        if not quiet and speaks:
            logging.basicConfig(level=logging.INFO, format="%(message)s")
            logging.getLogger("coalora.export.pipeline").setLevel(logging.INFO)
        result = run_export(opts)
    except ValueError as exc:
        raise fail(str(exc)) from None
    if speaks:
        for line in result.summary():
            typer.echo(line)


@export_app.command("slim")
def slim_cmd(
    bundle: Annotated[str, typer.Argument(help="An exported bundle directory.")],
    out: Annotated[str, typer.Option("--out", "-o", help="Where to write the slimmed bundle.")],
    max_bits: Annotated[
        float, typer.Option(help="Keep stored configurations up to this many bits per weight.")
    ],
    overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
    sign: Annotated[str | None, typer.Option(help=_flag_help("sign"))] = None,
) -> None:
    """Slim a bundle for a device class: keep the configurations up to --max-bits and ship only
    the (matrix, option) pairs they use.

    Example: coalora export slim smollm2-bbc/ --max-bits 4.5 --out smollm2-bbc-pi4/
    """
    from coalora.export.slim import slim_bundle
    from coalora.runtime.format.reader import Bundle

    if not (max_bits > 0 and max_bits < 64):
        raise fail(f"--max-bits must be a positive number of bits, got {max_bits}")
    try:
        path = slim_bundle(bundle, out, max_bits, overwrite=overwrite, sign_key=sign)
    except (ValueError, FileExistsError) as exc:
        raise fail(str(exc)) from None
    before = Bundle.open(bundle).size_on_disk()
    after = Bundle.open(path).size_on_disk()
    typer.echo(f"wrote {path}: {after / 1e6:.1f} MB on disk (from {before / 1e6:.1f} MB)")


# `export bundle` was this command's name up to 0.1: an alias for one release.
export_app.command("bundle", hidden=True, deprecated=True, help="Old name of `export slim`.")(
    slim_cmd
)


@app.command("inspect")
def inspect_cmd(
    bundle: Annotated[str, typer.Argument(help="A bundle directory.")],
    plot: Annotated[
        str | None, typer.Option(help="Also write a PNG of the metric against bits here.")
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(
            help="Check everything opening the bundle would, for every stored configuration: "
            "hashes, schema, tensor layouts, θ and the folded adapters, the tokenizer."
        ),
    ] = False,
    trusted_key: Annotated[
        str | None,
        typer.Option(
            help="Also check the bundle's signature against this public key (PEM); an "
            "unsigned or wrongly signed bundle is refused."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
) -> None:
    """Print a bundle's manifest summary (its signer included) and its Pareto table.

    Example: coalora inspect smollm2-bbc/ --plot pareto.png
    """
    from coalora.runtime.format.reader import Bundle
    from coalora.runtime.format.signing import verify_signature
    from coalora.runtime.report import bundle_summary, print_summary
    from coalora.runtime.verify import verify_bundle

    try:
        if trusted_key is not None:
            verify_signature(bundle, trusted_key)
        summary = bundle_summary(
            verify_bundle(bundle) if verify else Bundle.open(bundle),
            signature_checked=trusted_key is not None,
        )
    except ValueError as exc:
        raise fail(str(exc)) from None
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
    else:
        print_summary(summary)
    if plot:
        from coalora.export.plots import plot_pareto

        try:
            path = plot_pareto(summary, plot)
        except OSError as exc:
            raise fail(f"cannot write {plot}: {exc}") from None
        typer.echo(f"plot: {path}", err=as_json)


def _parse_sweep(text: str) -> dict[str, float]:
    """``"2.5:8:0.25"`` -> sweep_lo/hi/step (the step may be left out)."""
    parts = [p.strip().lower().removesuffix("bits") for p in text.split(":")]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (2, 3):  # also an unreadable number
        raise ValueError(f"cannot read --budgets {text!r}: expected LO:HI[:STEP], e.g. 2.5:8:0.25")
    out = {"sweep_lo": values[0], "sweep_hi": values[1]}
    if len(values) == 3:
        out["sweep_step"] = values[2]
    return out


def main() -> None:
    """Console entry point: usage errors (a missing option, a value of the wrong type) are one
    ``error:`` line and exit code 2, as the commands' own errors are."""
    import sys

    from coalora.runtime.entry import interrupted
    from coalora.runtime.tempfiles import exit_on_sigterm

    exit_on_sigterm()  # so a killed `export bundle` removes its partial output
    try:
        code = app(standalone_mode=False)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        if message.strip():  # no arguments at all: the help has been shown
            typer.echo(f"error: {' '.join(message.split())}", err=True)
        sys.exit(USAGE_ERROR)
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as exc:  # a Ctrl-C inside a lazily imported extension's initialisation
        if not interrupted(exc):
            raise
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
