"""What the tied embedding / LM head's option costs in quality, and what it saves in bytes.

The evidence the head needs before it joins the configuration (a matrix the allocator and the
Pareto set give bits to): for Gemma 3 270M and SmolLM2, the tied table is quantized at each
option exactly as the bundle ships it (``kernels.quantize``, then the MatMulNBits codes the
head reads and the embedding gathers), the rest of the model stays as loaded ("the shipped
weights"), and we measure

- held-out perplexity on the measuring batches of ``benchmarks.baselines`` (its split and
  settings), against the table as loaded;
- greedy generation from the first 24 tokens of held-out articles (64 new tokens): the share
  of repeated 4-grams in the continuation (does a low-bit head make generation repeat?) and
  how many tokens it agrees with the as-loaded table's continuation before the first
  difference;
- the head's bytes as the device holds them (``QuantOption.nbytes``), beside the body's at
  3.5 bits.

    python -m benchmarks.head_bits [--models gemma3,smollm2] [--threads 2] [--quick]
    python -m benchmarks.head_bits --report-only

writes benchmarks/results/head_bits.md and .json (``--quick``: one batch and one prompt, to
check the harness; it writes head_bits_quick.* instead, not a result).
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Any

from benchmarks.baselines import EVAL_BATCHES, SETTINGS
from benchmarks.common import (
    RESULTS,
    machine,
    machine_md,
    read_result,
    report_only_parser,
    write_result,
)
from coalora.kernels.options import QuantOption

MODELS: tuple[str, ...] = ("gemma3", "smollm2")
OPTIONS: tuple[str, ...] = ("8b32", "4b32", "4b64", "4b128", "2b32", "2b64")
AS_LOADED = "as loaded"
PROMPTS, PROMPT_TOKENS, NEW_TOKENS = 4, 24, 64
BODY_BITS = 3.5  # the budget the product is known by
STEM = "head_bits"


def repeated_4grams(ids: list[int]) -> float:
    """Share of the 4-grams of ``ids`` that occurred earlier in it (0: none repeats)."""
    grams = [tuple(ids[i : i + 4]) for i in range(len(ids) - 3)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def measure_model(name: str, quick: bool, threads: int | None) -> dict[str, Any]:
    import torch

    from coalora.export.inputs import load_data, load_for_training
    from coalora.export.options import ExportOptions
    from coalora.export.phases import held_out_batches
    from coalora.kernels import quantize
    from coalora.kernels.matmulnbits import dequantize, to_matmulnbits

    values = {**SETTINGS[name], "lm_head": "none"}  # the table as loaded, not the 8-bit codes
    if quick:
        values["limit"] = 200
    opts = ExportOptions.for_model(name, out="unused", threads=threads, **values)
    inp = load_for_training(opts, load_data(opts))
    model, tok = inp.loaded.model, inp.loaded.tokenizer
    model.eval()
    _, batches, _ = held_out_batches(
        inp.val_batches, opts.eval_batches, 1 if quick else EVAL_BATCHES[name]
    )
    emb = model.get_input_embeddings()
    if not getattr(model.config, "tie_word_embeddings", False):
        raise SystemExit(f"error: {name}'s head is not tied to its embedding")
    table = emb.weight.detach().clone()
    vocab, hidden = table.shape
    prompts = [
        tok(t, return_tensors="pt").input_ids[:, :PROMPT_TOKENS]
        for t in inp.split.val.texts[: 1 if quick else PROMPTS]
    ]
    body = sum(m.n_params for m in inp.space.matrices)

    @torch.no_grad()
    def score() -> dict[str, Any]:
        total, count = 0.0, 0
        for batch in batches:
            out = model(**batch)
            n = int((batch["labels"][..., 1:] != -100).sum())
            total, count = total + float(out.loss) * n, count + n
        texts = []
        for ids in prompts:
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=NEW_TOKENS,
                do_sample=False,
                pad_token_id=tok.pad_token_id or tok.eos_token_id,
            )
            texts.append(gen[0, ids.shape[1] :].tolist())
        return {"perplexity": math.exp(total / count), "continuations": texts}

    rows: list[dict[str, Any]] = []
    for option in (AS_LOADED, *OPTIONS):
        t0 = time.perf_counter()
        if option == AS_LOADED:
            mb = vocab * hidden * 4 / 1e6  # fp32, as a device would hold the table unquantized
        else:
            opt = QuantOption.parse(option)
            q = to_matmulnbits(quantize(table.float().numpy(), opt))
            with torch.no_grad():
                emb.weight.copy_(torch.from_numpy(dequantize(q)).to(emb.weight.dtype))
            mb = opt.nbytes(vocab, hidden) / 1e6
        row = {"option": option, "head_mb": mb, **score()}
        row["seconds"] = time.perf_counter() - t0
        print(f"[head_bits] {name} {option}: {row['perplexity']:.2f}", file=sys.stderr, flush=True)
        rows.append(row)
        with torch.no_grad():
            emb.weight.copy_(table)
    ref = rows[0]
    ref_conts = ref["continuations"]
    for r in rows:
        conts = r.pop("continuations")
        r["repeated_4grams"] = sum(map(repeated_4grams, conts)) / len(conts)
        agree = [agreeing_prefix(c, g) for c, g in zip(conts, ref_conts, strict=True)]
        r["agreeing_tokens"] = sum(agree) / len(agree)
        r["ppl_ratio"] = r["perplexity"] / ref["perplexity"]
    return {
        "model": name,
        "vocab": vocab,
        "hidden": hidden,
        "head_params": vocab * hidden,
        "body_params": body,
        "body_mb_at_3_5_bits": body * BODY_BITS / 8 / 1e6,
        "measuring_tokens": sum(int((b["labels"][..., 1:] != -100).sum()) for b in batches),
        "rows": rows,
    }


def summary(res: dict[str, Any]) -> dict[str, Any]:
    """Per model and head option: perplexity against the table as loaded, repeated 4-grams
    in greedy continuations, and the head's MB."""

    def per(key: str) -> dict[str, dict[str, float]]:
        return {r["model"]: {row["option"]: row[key] for row in r["rows"]} for r in res["results"]}

    return {
        "perplexity_ratio": per("ppl_ratio"),
        "repeated_4grams": per("repeated_4grams"),
        "head_mb": per("head_mb"),
    }


def report(res: dict[str, Any]) -> str:
    lines = [
        "# The tied embedding / LM head at each option (no adapter)",
        "",
        "The tied table quantized at each option as the bundle ships it; every other weight as "
        "loaded. Perplexity on the held-out measuring batches of `benchmarks.baselines`; greedy "
        f"continuations of {PROMPTS} held-out articles' first {PROMPT_TOKENS} tokens "
        f"({NEW_TOKENS} new tokens): repeated 4-grams, and tokens agreeing with the as-loaded "
        "table's continuation before the first difference.",
        "",
        *machine_md(res["machine"], res["command"], res["wall_s"]),
    ]
    for m in res["results"]:
        share = m["head_params"] / (m["head_params"] + m["body_params"])
        lines += [
            "",
            f"## {m['model']}: {m['vocab']:,} x {m['hidden']} table ({share:.0%} of the "
            f"parameters with the quantized matrices); the body at {BODY_BITS} bits is "
            f"{m['body_mb_at_3_5_bits']:.0f} MB; {m['measuring_tokens']:,} measuring tokens",
            "",
            "| head | MB | perplexity | vs as loaded | repeated 4-grams | agreeing tokens |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in m["rows"]:
            lines.append(
                f"| {r['option']} | {r['head_mb']:.1f} | {r['perplexity']:.2f} | "
                f"{r['ppl_ratio']:.3f} | {r['repeated_4grams']:.3f} | "
                f"{r['agreeing_tokens']:.1f} / {NEW_TOKENS} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = report_only_parser(__doc__)
    p.add_argument("--models", default=",".join(MODELS), help="comma-separated models")
    p.add_argument("--threads", type=int, default=None, help="torch threads [torch's]")
    p.add_argument("--quick", action="store_true", help="a batch and a prompt: the harness")
    args = p.parse_args(argv)
    if args.report_only:
        res = read_result(RESULTS / f"{STEM}.json")
        write_result(STEM, {**res, "summary": summary(res)}, report(res))
        return 0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in MODELS for m in models):
        print(f"error: --models must be some of {', '.join(MODELS)}", file=sys.stderr)
        return 2
    if args.threads is not None and args.threads < 1:
        print("error: --threads must be >= 1", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    results = [measure_model(m, args.quick, args.threads) for m in models]
    res = {
        "results": results,
        "command": ("python -m benchmarks.head_bits " + " ".join(argv or sys.argv[1:])).strip(),
        "machine": machine(),
        "wall_s": time.perf_counter() - t0,
    }
    write_result(
        STEM + ("_quick" if args.quick else ""), {**res, "summary": summary(res)}, report(res)
    )
    print(f"[head_bits] done in {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
