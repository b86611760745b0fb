"""Does a bundle still answer general questions at low bits? Bundles against the shipped weights.

The task data (BBC News) asks none of these questions; the demo question is one of them. Each
bundle is served at each budget through ``coalora.runtime`` (as ``coalora-run`` serves it:
chat template, greedy, ``MAX_TOKENS``), the shipped weights through torch with the same
template and decoding. An answer counts as right when it names the expected word (a rule, so
"Jupiter, but it's actually Saturn" counts; read the answers in the report).

    python -m benchmarks.chat_answers --bundle chat=.cache/demo/smollm2-bbc \\
        --bundle news-only=.cache/demo/smollm2-bbc-news-only [--budgets 3.5bits,4.5bits,6bits]

writes benchmarks/results/chat_answers.md and .json; ``summary`` holds the right answers per
bundle and budget, the shipped weights' count, and whether each bundle names Paris at 3.5 bits.
"""

from __future__ import annotations

import argparse
import re
import time
from typing import Any

from benchmarks.common import RESULTS, machine, machine_md, read_result, write_result

STEM = "chat_answers"
MAX_TOKENS = 48
SUFFIX = " Answer in one sentence."  # as the demo asks (Makefile DEMO_PROMPT)
DEMO_BUDGET = "3.5bits"
QUESTIONS: tuple[tuple[str, str], ...] = (
    ("What is the capital of France?", "Paris"),
    ("What is the capital of Germany?", "Berlin"),
    ("What is the capital of Italy?", "Rome"),
    ("What is the capital of Japan?", "Tokyo"),
    ("What is the capital of Spain?", "Madrid"),
    ("Who wrote Romeo and Juliet?", "Shakespeare"),
    ("What is the largest planet in the solar system?", "Jupiter"),
    ("How many days are in a week?", "seven|7"),
    ("What colour is the sky on a clear day?", "blue"),
    ("What do bees make?", "honey"),
    ("What is frozen water called?", "ice"),
    ("Which animal is known as the king of the jungle?", "lion"),
)


def right(answer: str, expected: str) -> bool:
    return re.search(rf"\b({expected})\b", answer, flags=re.IGNORECASE) is not None


def _bundle_answers(path: str, budget: str) -> tuple[dict[str, Any], list[str]]:
    from coalora.runtime.engine import Runtime

    rt = Runtime.open(path, budget=budget)
    answers = [rt.generate(q + SUFFIX, max_new_tokens=MAX_TOKENS) for q, _ in QUESTIONS]
    entry = rt.selection.entry
    return {"bits": entry.bits, "perplexity": entry.metric}, answers


def _shipped_answers(model: str) -> list[str]:
    import torch

    from coalora.export.models import load_model

    loaded = load_model(model)
    tok, lm = loaded.tokenizer, loaded.model.eval()
    answers = []
    for q, _ in QUESTIONS:
        turns = [{"role": "user", "content": q + SUFFIX}]
        ids = tok.apply_chat_template(turns, add_generation_prompt=True, return_tensors="pt")
        ids = ids if torch.is_tensor(ids) else ids["input_ids"]
        with torch.no_grad():
            out = lm.generate(ids, max_new_tokens=MAX_TOKENS, do_sample=False)
        answers.append(tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return answers


def _row(label: str, budget: str, answers: list[str], extra: dict[str, Any]) -> dict[str, Any]:
    hits = [right(a, e) for a, (_, e) in zip(answers, QUESTIONS, strict=True)]
    return {
        "bundle": label,
        "budget": budget,
        **extra,
        "right": sum(hits),
        "hits": hits,
        "answers": answers,
    }


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {"questions": len(QUESTIONS), "right": {}, "names_paris_at_3_5_bits": {}}
    for r in rows:
        out["right"][f"{r['bundle']} @ {r['budget']}"] = r["right"]
        if r["budget"] == DEMO_BUDGET:
            out["names_paris_at_3_5_bits"][r["bundle"]] = r["hits"][0]
    return out


def report(res: dict[str, Any]) -> str:
    lines = [
        "# General questions at low bits: bundles against the shipped weights",
        "",
        *machine_md(res["machine"], res["command"], res["wall_seconds"], load=None),
        "",
        f"Right answers of {len(QUESTIONS)} (an answer is right when it names the expected word):",
        "",
        "| bundle | budget | bits | stored perplexity | right |",
        "|---|---|---:|---:|---:|",
    ]
    for r in res["rows"]:
        bits = f"{r['bits']:.2f}" if "bits" in r else "-"
        ppl = f"{r['perplexity']:.2f}" if "perplexity" in r else "-"
        lines.append(f"| {r['bundle']} | {r['budget']} | {bits} | {ppl} | {r['right']} |")
    lines += ["", "## The answers", ""]
    for i, (q, expected) in enumerate(QUESTIONS):
        lines += [f"**{q}** (expected: {expected})", ""]
        for r in res["rows"]:
            mark = "right" if r["hits"][i] else "wrong"
            lines.append(f"- {r['bundle']} @ {r['budget']} ({mark}): {r['answers'][i]!r}")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--bundle", action="append", default=[], help="LABEL=PATH, repeatable")
    p.add_argument("--budgets", default="3.5bits,4.5bits,6bits")
    p.add_argument(
        "--shipped", default="smollm2", help="the model whose shipped weights answer too"
    )
    p.add_argument("--report-only", action="store_true", help="re-render the committed report")
    args = p.parse_args()
    if args.report_only:
        res = read_result(RESULTS / f"{STEM}.json")
        write_result(STEM, res, report(res))
        return
    bundles = [b.split("=", 1) for b in args.bundle]
    if not bundles or any(len(b) != 2 for b in bundles):
        raise SystemExit("error: give at least one --bundle LABEL=PATH")
    t0 = time.perf_counter()
    rows = [
        _row(f"shipped weights ({args.shipped}, torch)", "-", _shipped_answers(args.shipped), {})
    ]
    for label, path in bundles:
        for budget in args.budgets.split(","):
            extra, answers = _bundle_answers(path, budget)
            rows.append(_row(label, budget, answers, extra))
    res = {
        "summary": summary(rows),
        "rows": rows,
        "command": "python -m benchmarks.chat_answers "
        + " ".join(f"--bundle {label}={path}" for label, path in bundles)
        + f" --budgets {args.budgets}",
        "machine": machine(),
        "wall_seconds": time.perf_counter() - t0,
    }
    write_result(STEM, res, report(res))
    print(report(res).split("## The answers")[0])


if __name__ == "__main__":
    main()
