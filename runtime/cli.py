"""``coalora-run``: serve a bundle from the command line.

The answer (or the classification) goes to stdout; the chosen configuration, the memory plan
and timings go to stderr, so ``coalora-run b --prompt hi > answer.txt`` captures only the
answer. Every bad input ends with one ``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from typing import Annotated, Any

import typer

from coalora.runtime.budget import BudgetError, format_bytes
from coalora.runtime.format.reader import BundleError
from coalora.runtime.isa import DEVICE_CLASSES, DeviceClassError
from coalora.runtime.profiles import ProfileError, list_profiles, load_profile
from coalora.runtime.report import option_histogram
from coalora.runtime.selection import SelectionError

EXIT_BAD_INPUT = 2

EXAMPLES = """
Examples:

  coalora-run bundle/ --prompt "What is a budget?"           # auto budget from free memory

  coalora-run bundle/ --budget 3.5bits --prompt "Hi"          # at most 3.5 bits per weight

  coalora-run bundle/ --budget 600MB --dry-run               # show the choice and plan only

  coalora-run bundle/ --profile rpi4-4gb --dry-run --json    # plan for another device

  coalora-run bundle/ --min-speed 40 --prompt "Hi"            # best that decodes >= 40 tok/s

  echo "Tell me a story" | coalora-run bundle/ --max-tokens 64 --temperature 0.7 --seed 1

  coalora-run classifier/ --classify "Shares fell sharply today"

  coalora-run --list-profiles
"""

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


class InputError(Exception):
    """A bad input from the command line: printed as one line, exit code 2."""


def _err(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _choice_dict(rt: Any) -> dict[str, Any]:
    sel = rt.selection
    e = sel.entry
    return {
        "bundle": str(rt.bundle.root),
        "task": rt.task,
        "budget": str(sel.budget),
        "profile": rt.profile.name if rt.profile else None,
        "context_length": rt.context_length,
        "bits": e.bits,
        "options": dict(sorted(Counter(str(o) for o in e.config.values()).items())),
        "lm_head": e.config.head.name if e.config.head is not None else rt.bundle.lm_head,
        "metric_name": rt.pareto.metric_name,
        "metric": e.metric,
        "seen_in_training": e.seen_in_training,
        "reason": sel.reason,
        "cpu": sel.cpu.describe() if sel.cpu else None,
        "slow_options_fallback": sel.slow_fallback,
        "min_speed": rt.min_speed,
        "threads": rt.threads,
        "spin": rt.spin.spin if rt.spin else None,
        "predicted_tok_s": sel.predicted_tok_s,
        "plan": sel.plan.to_dict(),
    }


def _speed_rows(rt: Any) -> list[dict[str, Any]]:
    """Every stored configuration with its plan and predicted decode speed (dry runs)."""
    if rt.task != "causal-lm":
        return []
    chosen = rt.selection.config
    rows = []
    warned = False
    for e in sorted(rt.pareto.entries, key=lambda e: e.bits):
        try:
            predicted = rt.predicted_tok_s(e.config, rt.profile)
        except Exception as exc:  # onnxruntime's own types, or SpeedError
            # The plan is still shown where this machine cannot price a decode (a probe
            # onnxruntime refuses); only the prediction is left out.
            predicted = None
            if not warned:
                _err(f"warning: no decode speed prediction on this machine ({str(exc)[:200]})")
                warned = True
        rows.append(
            {
                "bits": e.bits,
                "head": e.config.head.name if e.config.head is not None else None,
                "metric": e.metric,
                "plan_bytes": rt.plan(e.config).total,
                "predicted_tok_s": predicted,
                "chosen": e.config == chosen,
            }
        )
    return rows


def _print_speeds(rt: Any, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title="stored configurations (decode speed predicted from "
        f"{rt.speed_source(rt.profile) or 'nothing: not measured'})",
        title_justify="left",
    )
    for name in ("bits", rt.pareto.metric_name, "plan", "predicted tok/s", ""):
        table.add_column(name, justify="right" if name else "left")
    for r in rows:
        table.add_row(
            f"{r['bits']:.2f}" + (f" (head {r['head']})" if r["head"] else ""),
            f"{r['metric']:.4g}",
            format_bytes(r["plan_bytes"], "MB"),
            "-" if r["predicted_tok_s"] is None else f"{r['predicted_tok_s']:.1f}",
            "chosen" if r["chosen"] else "",
        )
    Console(stderr=True, highlight=False).print(table)


def _print_choice(rt: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    sel = rt.selection
    e = sel.entry
    console = Console(stderr=True, highlight=False)
    console.print(
        f"configuration: {e.bits:.2f} bits ({option_histogram(e.config)}), "
        f"{rt.pareto.metric_name} {e.metric:.4g}"
        f"{'' if e.seen_in_training else ' (unseen in training)'}"
    )
    console.print(f"why: {sel.reason}")
    table = Table(title=f"memory plan (context {rt.context_length} tokens)", title_justify="left")
    table.add_column("part")
    table.add_column("bytes", justify="right")
    plan = sel.plan
    for label, value in (
        ("quantized weights", plan.quantized_weights_bytes),
        ("other weights", plan.other_weights_bytes),
        ("LoRA", plan.lora_bytes),
        ("KV cache", plan.kv_cache_bytes),
        ("runtime", plan.runtime_overhead_bytes),
        ("build scratch", plan.build_scratch_bytes),
        ("total", plan.total),
    ):
        table.add_row(label, format_bytes(value, "MB"))
    console.print(table)


def _read_stdin() -> str:
    data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read()
    if isinstance(data, str):
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"stdin is not valid UTF-8 (byte {exc.start})") from None


def _stdin_is_tty() -> bool:
    try:
        return sys.stdin is None or sys.stdin.isatty()
    except (AttributeError, ValueError):
        return True


def _list_profiles() -> None:
    for name in list_profiles():
        p = load_profile(name)
        sys.stdout.write(
            f"{name:<20} {format_bytes(p.usable_ram_bytes, 'MB'):>10} usable, "
            f"{p.threads} threads  {p.description}\n"
        )


@app.command(
    help="Serve a coalora bundle: generate text or classify, within a memory budget.",
    epilog=EXAMPLES,
)
def run(
    bundle: Annotated[
        str | None, typer.Argument(help="bundle directory", show_default=False)
    ] = None,
    budget: Annotated[
        str,
        typer.Option(
            help="3.5bits (bits per weight), 600MB / 1.5GB / 2GiB (whole process), or auto"
        ),
    ] = "auto",
    profile: Annotated[
        str | None, typer.Option(help="plan for a device profile (see --list-profiles)")
    ] = None,
    device_class: Annotated[
        str | None,
        typer.Option(
            help=f"CPU class whose slow options to avoid ({', '.join(DEVICE_CLASSES)}; 'any' "
            "avoids none); default: the profile's, else this CPU's (HWCAP / /proc/cpuinfo)",
            show_default=False,
        ),
    ] = None,
    prompt: Annotated[str | None, typer.Option(help="prompt text (default: stdin)")] = None,
    classify: Annotated[
        str | None, typer.Option("--classify", help="text to classify (encoder bundles)")
    ] = None,
    max_tokens: Annotated[int, typer.Option(help="most tokens to generate", min=1)] = 128,
    temperature: Annotated[float, typer.Option(help="0 is greedy", min=0.0)] = 0.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass, in (0, 1]")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="sampling seed")] = None,
    system: Annotated[str | None, typer.Option(help="system message for the chat format")] = None,
    no_chat: Annotated[bool, typer.Option("--no-chat", help="send the prompt as raw text")] = False,
    context: Annotated[
        int, typer.Option(help="context length in tokens (KV cache size)", min=2)
    ] = 512,
    threads: Annotated[
        int | None, typer.Option(help="intra-op threads (default: physical cores)", min=1)
    ] = None,
    exact: Annotated[
        bool,
        typer.Option(
            "--exact",
            help="fp32 activations and LoRA branch: matches the exporter's torch model token "
            "for token; 2- and 8-bit matrices run as fp32 MatMul of their dequantized weights "
            "(onnxruntime has no fp32-activation kernel for them), so it decodes at about 0.6x "
            "the fast path (0.4x on a loaded machine) and plans 2-3x the memory (a check, not "
            "a serving mode; default: int8 activations, the fast CPU path)",
        ),
    ] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print the choice and memory plan, build nothing")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="machine-readable output on stdout")
    ] = False,
    list_profiles_: Annotated[
        bool, typer.Option("--list-profiles", help="list the known device profiles and exit")
    ] = False,
    adapt: Annotated[
        bool,
        typer.Option(
            "--adapt", help="re-check free memory before answering and switch configuration"
        ),
    ] = False,
    min_speed: Annotated[
        float | None,
        typer.Option(
            "--min-speed",
            help="compute budget: the best configuration predicted to decode at least this "
            "many tok/s on this device (or the profile's), within the memory budget too; "
            "--dry-run shows the prediction per configuration",
            show_default=False,
        ),
    ] = None,
    spin: Annotated[
        str,
        typer.Option(
            help="whether onnxruntime's threads spin between nodes: auto turns it off when "
            "other processes keep the cores busy (spinning then takes the CPU from the "
            "decode), on, off"
        ),
    ] = "auto",
    trusted_key: Annotated[
        str | None,
        typer.Option(
            help="public key (PEM): refuse the bundle unless this key's pair signed it "
            "(OpenSSF model-signing; needs the sign extra)",
            show_default=False,
        ),
    ] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="print only the answer")] = False,
) -> None:
    from coalora.runtime.engine import Runtime, RuntimeInputError
    from coalora.runtime.sampling import SamplingParams

    if list_profiles_:
        _list_profiles()
        return
    if bundle is None:
        raise InputError("missing BUNDLE (a bundle directory); see --help")
    if prompt is not None and classify is not None:
        raise InputError("give either --prompt or --classify, not both")
    try:
        sampling = SamplingParams(temperature=temperature, top_p=top_p, seed=seed)
    except ValueError as exc:
        raise InputError(str(exc)) from None

    rt = Runtime.open(
        bundle,
        budget=budget,
        profile=profile,
        context_length=context,
        threads=threads,
        build=False,
        adapt=adapt,
        device_class=device_class,
        min_speed=min_speed,
        spin=spin,
        trusted_key=trusted_key,
        **({"lora_bits": 32, "accuracy_level": 0} if exact else {}),
    )
    if dry_run:
        rows = _speed_rows(rt)
        if as_json:
            out = {**_choice_dict(rt), "configurations": rows}
            sys.stdout.write(json.dumps(out, indent=1) + "\n")
        else:
            _print_choice(rt)
            if rows:
                _print_speeds(rt, rows)
        return

    text = classify if classify is not None else prompt
    if text is None:
        if _stdin_is_tty():
            raise InputError("no input: give --prompt, --classify, or text on stdin")
        text = _read_stdin()
    if rt.task == "classify":
        if prompt is not None:
            raise RuntimeInputError("this bundle is a classify model: use --classify TEXT")
        if not text.strip():
            raise RuntimeInputError("empty text")
    else:
        if classify is not None:
            raise RuntimeInputError("this bundle is a causal-lm model: use --prompt TEXT")
        # Checked before anything is built or printed.
        rt.encode_prompt(text, chat=not no_chat, system=system)

    rt.build()
    if not quiet and not as_json:
        _print_choice(rt)
        t = rt.timings
        _err(
            f"adapter: θ {t.theta_s * 1e3:.1f} ms + fold {t.fold_s * 1e3:.1f} ms; "
            f"graph {t.graph_s * 1e3:.0f} ms, session {t.session_s * 1e3:.0f} ms; "
            f"{rt.threads} threads, {rt.spin.reason if rt.spin else 'spinning not chosen'}"
        )
    if rt.task == "classify":
        result = rt.classify(text)
        if as_json:
            out = {**_choice_dict(rt), "label": result.label, "probs": result.probs}
            sys.stdout.write(json.dumps(out, indent=1) + "\n")
        else:
            sys.stdout.write(result.label + "\n")
            if not quiet:
                probs = ", ".join(f"{k} {v:.3f}" for k, v in result.probs.items())
                _err(f"probabilities: {probs}")
        return

    pieces = rt.stream(
        text, max_new_tokens=max_tokens, sampling=sampling, chat=not no_chat, system=system
    )
    if as_json:
        answer = "".join(pieces)
        s = rt.last_stats
        out = {
            **_choice_dict(rt),
            "answer": answer,
            "timings": rt.timings.to_dict(),
            "stats": {
                "prompt_tokens": s.prompt_tokens,
                "new_tokens": s.new_tokens,
                "prefill_ms": s.prefill_ms,
                "decode_tok_s": s.decode_tok_s,
                "stopped": s.stopped,
            },
        }
        sys.stdout.write(json.dumps(out, indent=1) + "\n")
        return
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    if not quiet and rt.last_stats is not None:
        _err(rt.last_stats.describe())


def main(argv: list[str] | None = None) -> None:
    """Console entry point: exit 0 on success, 2 with one ``error:`` line on bad input (or a
    bundle whose weights compute NaN)."""
    from coalora.runtime.engine import ModelOutputError, RuntimeInputError
    from coalora.runtime.tempfiles import exit_on_sigterm

    exit_on_sigterm()
    bad_input = (
        InputError,
        BudgetError,
        BundleError,
        SelectionError,
        ProfileError,
        DeviceClassError,
        RuntimeInputError,
        ModelOutputError,
    )
    try:
        code = app(args=argv, prog_name="coalora-run", standalone_mode=False)
    except bad_input as exc:
        _err(f"error: {exc}")
        sys.exit(EXIT_BAD_INPUT)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:  # usage errors: bad option values, unknown options
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        _err(f"error: {' '.join(message.split())}")
        sys.exit(EXIT_BAD_INPUT)
    except (typer.Abort, KeyboardInterrupt):
        _err("error: interrupted")
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
