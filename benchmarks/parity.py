"""Device/workstation parity: onnxruntime on the real bundle vs the torch fake-quant model.

For each of several stored configurations of a bundle, the device path (``Runtime``: θ as
ONNX, folded adapter, MatMulNBits with accuracy_level 4, 8-bit LoRA side branch, quantized LM
head) is compared with the model the adapter was trained as: the torch ``CoALoRAModel`` built
exactly as ``export.pipeline.run_export`` builds it (same CoALoRAConfig, space, quantizer and
calibration importance from the work directory), the checkpoint's adapter loaded and
``set_configuration(config)`` applied. Both sides get the same token ids.

    python -m benchmarks.parity --bundle .cache/demo/smollm2-bbc \
        [--minilm-bundle .cache/demo/minilm-bbc]

Writes benchmarks/results/parity.md and .json. SmolLM2: logits differences along each
prompt's device continuation (teacher-forced in torch), greedy continuations (first
divergence, capped at --tokens), a decomposition of where the difference comes from (LoRA
branch at 8 vs 32 bits on the device; fp32 vs fake-quantized head on torch). MiniLM:
agreement of ``Runtime.classify`` with torch on BBC articles the export never used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS, machine, read_result, with_summary
from benchmarks.parity_report import write_report
from benchmarks.parity_sides import (
    N_BBC_PROMPTS,
    activate,
    check_adapter,
    check_codes,
    device_greedy,
    first_divergence,
    lm_prompts,
    pick_entries,
    torch_forced_logits,
    torch_greedy,
    torch_side,
)
from coalora.runtime.format.spec import BASE_FILE, MANIFEST, Arch, FileEntry, Key, Training


def bundle_head(bundle: Path) -> np.ndarray:
    """The quantized LM head the device runs, dequantized to float32 [vocab, hidden]."""
    from coalora.kernels.matmulnbits import dequantize
    from coalora.runtime import assemble
    from coalora.runtime.format.reader import Bundle

    b = Bundle.open(bundle)
    mapped = assemble.MappedBundle(b)
    return dequantize(assemble.lm_head(mapped, assemble.arch_of(b)))


def run_smollm2(bundle: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from torch import nn

    from coalora.runtime.budget import Budget
    from coalora.runtime.engine import Runtime

    t0 = time.perf_counter()
    manifest = json.loads((bundle / MANIFEST).read_text())
    model, loaded, inp, work = torch_side(bundle)
    t_load = time.perf_counter() - t0
    print(f"torch side ready in {t_load:.0f} s (work dir {work})", flush=True)

    # The device's LM head: the bundle's own codes, dequantized (quantizing the torch table
    # again would not give them back where that table already is the head's codes). The torch
    # model gets it as an untied lm_head for parity.
    emb = loaded.model.get_input_embeddings().weight.detach().float()
    head_name = manifest[Key.ARCHITECTURE].get(Arch.LM_HEAD)
    heads = {"fp32": emb}
    if head_name:
        qhead = bundle_head(bundle)
        heads["q"] = torch.from_numpy(np.ascontiguousarray(qhead))
        lin = nn.Linear(emb.shape[1], emb.shape[0], bias=False)
        lin.weight = nn.Parameter(heads["q"], requires_grad=False)
        loaded.model.lm_head = lin  # untied: the input embeddings stay fp32, as on the device
    head_key = "q" if head_name else "fp32"

    rt = Runtime.open(bundle, budget="8bits", threads=args.ort_threads, build=False)
    entries = pick_entries(rt.pareto, args.bits, args.configs)
    prompts = lm_prompts(rt, manifest)
    n = args.tokens
    sample = [m.name for m in rt.bundle.space.matrices[:7]]
    results = []
    for e in entries:
        tc = time.perf_counter()
        activate(rt, Budget.bits(e.bits))
        assert rt.config == e.config, "budget selection did not pick the wanted configuration"
        model.set_configuration(e.config)
        row: dict[str, Any] = {
            "bits": e.bits,
            "nbytes": e.nbytes,
            "metric": e.metric,
            "seen_in_training": e.seen_in_training,
            "options_used": sorted({o.name for _, o in e.config.items()}),
        }
        row["codes_max_abs_diff"] = check_codes(model, rt, e.config, sample)
        row["adapter_A_max_rel_diff"] = check_adapter(model, rt, e.config)

        dev_tok, dev_logits, diffs = [], [], {k: [] for k in heads}
        agree = {k: 0 for k in heads}
        positions = 0
        for _, ids in prompts:
            toks, lg = device_greedy(rt, ids, n)
            dev_tok.append(toks)
            dev_logits.append(lg)
            forced = torch_forced_logits(model, ids, toks, heads)
            for k, tl in forced.items():
                diffs[k].append(np.abs(tl - lg))
                agree[k] += int((tl.argmax(-1) == lg.argmax(-1)).sum())
            positions += n
        # the public loop gives the same tokens (up to EOS, where it stops)
        pub = rt.generate_ids(prompts[0][1], n)
        row["generate_ids_matches_loop"] = pub == dev_tok[0][: len(pub)]
        t_dev = time.perf_counter() - tc

        torch_tok = [torch_greedy(model, ids, n) for _, ids in prompts]
        div = [first_divergence(a, b) for a, b in zip(dev_tok, torch_tok, strict=True)]
        scale = float(np.mean([lg.std(-1).mean() for lg in dev_logits]))
        row["logit_std"] = scale
        for k in heads:
            d = np.concatenate([x.ravel() for x in diffs[k]])
            row[f"logits_{k}_head"] = {
                "max_abs": float(d.max()),
                "mean_abs": float(d.mean()),
                "top1_agreement": agree[k] / positions,
            }
        # per prompt kind
        row["divergence"] = div
        row["identical"] = int(sum(d == n for d in div))
        row["median_divergence"] = float(np.median(div))
        row["prompts_identical_bbc"] = int(sum(d == n for d in div[:N_BBC_PROMPTS]))
        row["prompts_identical_chat"] = int(sum(d == n for d in div[N_BBC_PROMPTS:]))

        # where the difference comes from: the device's LoRA branch at 32 bits
        if args.lora32:
            rt32 = Runtime.open(
                bundle, budget=Budget.bits(e.bits), threads=args.ort_threads, lora_bits=32
            )
            d32, dv32 = [], []
            for (_, ids), toks, _lg in zip(prompts, dev_tok, dev_logits, strict=True):
                t32, lg32 = device_greedy(rt32, ids, n)
                forced = torch_forced_logits(model, ids, toks, {"k": heads[head_key]})["k"]
                # teacher-forced on the 8-bit path's tokens: compare where paths agree
                m = first_divergence(toks, t32)
                d32.append(np.abs(forced[: m + 1] - lg32[: m + 1]).ravel())
                dv32.append(m)
            rt32.close()
            del rt32
            d = np.concatenate(d32)
            row["lora32"] = {
                "max_abs": float(d.max()),
                "mean_abs": float(d.mean()),
                "divergence_from_lora8": dv32,
            }
        # the same device path with fp32 activations (accuracy_level 0) and an fp32 LoRA branch:
        # what is left once the int8 activations are gone
        if args.exact:
            rt0 = Runtime.open(
                bundle,
                budget=Budget.bits(e.bits),
                threads=args.ort_threads,
                lora_bits=32,
                accuracy_level=0,
            )
            d0, div0 = [], []
            for (_, ids), ttoks in zip(prompts, torch_tok, strict=True):
                t0_, lg0 = device_greedy(rt0, ids, n)
                forced = torch_forced_logits(model, ids, t0_, {"k": heads[head_key]})["k"]
                d0.append(np.abs(forced - lg0).ravel())
                div0.append(first_divergence(t0_, ttoks))
            rt0.close()
            del rt0
            d = np.concatenate(d0)
            row["exact"] = {
                "max_abs": float(d.max()),
                "mean_abs": float(d.mean()),
                "divergence": div0,
                "identical": int(sum(v == n for v in div0)),
                "median_divergence": float(np.median(div0)),
            }
            print(
                f"  accuracy_level 0 + fp32 LoRA: logits max {d.max():.4f}, identical "
                f"{row['exact']['identical']}/{len(prompts)}",
                flush=True,
            )
        # the cost of the 8-bit LoRA and the device quantization, measured against the same
        # model without any adapter: how big is the adapter's effect at all
        row["seconds"] = round(time.perf_counter() - tc, 1)
        row["device_seconds"] = round(t_dev, 1)
        results.append(row)
        lq = row[f"logits_{head_key}_head"]
        print(
            f"{e.bits:.3f} bits: logits max {lq['max_abs']:.3f} mean {lq['mean_abs']:.4f} "
            f"top1 {lq['top1_agreement']:.3f}; identical {row['identical']}/{len(prompts)}, "
            f"median divergence {row['median_divergence']:.0f} ({row['seconds']:.0f} s)",
            flush=True,
        )
    rt.close()
    sizes = size_table(bundle, manifest, rt)
    speed = (
        exact_speed(bundle, entries[len(entries) // 2].bits, prompts[0][1]) if args.exact else None
    )
    return {
        "exact_speed": speed,
        "model": manifest[Key.TRAINING][Training.MODEL],
        "bundle": str(bundle),
        "work_dir": str(work),
        "lm_head": head_name,
        "lora_bits": rt.lora_bits,
        "ort_threads": args.ort_threads,
        "tokens": n,
        "prompts": [p for p, _ in prompts],
        "prompt_tokens": [len(ids) for _, ids in prompts],
        "configs": results,
        "sizes": sizes,
        "load_s": round(t_load, 1),
    }


def exact_speed(
    bundle: Path, bits: float, ids: list[int], rounds: int = 5, tokens: int = 64, threads: int = 2
) -> dict[str, Any]:
    """Decode tok/s of the fast path and the exact path at one configuration, alternating
    rounds in one process (timings here are noisy: the ratio per round is what counts)."""
    from coalora.runtime.budget import Budget
    from coalora.runtime.engine import Runtime

    budget = Budget.bits(bits)
    paths = {
        "fast": Runtime.open(bundle, budget=budget, threads=threads),
        "exact": Runtime.open(
            bundle, budget=budget, threads=threads, lora_bits=32, accuracy_level=0
        ),
    }
    tok_s: dict[str, list[float]] = {k: [] for k in paths}
    for r in range(rounds + 1):  # round 0 warms up
        for k, rt in paths.items():
            time.sleep(0.5)
            t0 = time.perf_counter()
            device_greedy(rt, ids, tokens)
            if r:
                tok_s[k].append(tokens / (time.perf_counter() - t0))
    for rt in paths.values():
        rt.close()
    ratios = [e / f for e, f in zip(tok_s["exact"], tok_s["fast"], strict=True)]
    return {
        "bits": bits,
        "threads": threads,
        "tokens": tokens,
        "tok_s": tok_s,
        "median_tok_s": {k: float(np.median(v)) for k, v in tok_s.items()},
        "exact_over_fast_median": float(np.median(ratios)),
    }


def size_table(bundle: Path, manifest: dict[str, Any], rt: Any) -> dict[str, Any]:
    """Sizes from the bundle alone: the original model's parameters are the quantized
    matrices (from the space) plus every tensor of base.safetensors but the quantized head."""
    from safetensors import safe_open

    files = {k: int(v[FileEntry.BYTES]) for k, v in manifest[Key.FILES].items()}
    on_disk = sum(files.values()) + (bundle / MANIFEST).stat().st_size
    other = 0
    with safe_open(str(bundle / BASE_FILE), "np") as f:
        for k in f.keys():  # noqa: SIM118
            if not k.startswith("lm_head."):
                other += int(np.prod(f.get_slice(k).get_shape()))
    quant_params = sum(m.out_features * m.in_features for m in rt.bundle.space.matrices)
    n_params = quant_params + other  # a tied head counted once
    entries = rt.pareto.entries
    per_config = [int(e.nbytes) + 2 * other for e in entries]
    lora_fp16 = sum(
        2 * rt.bundle.lora_rank * (m.in_features + m.out_features) for m in rt.bundle.space.matrices
    )
    return {
        "bundle_bytes": on_disk,
        "files": files,
        "params": int(n_params),
        "quantized_params": int(quant_params),
        "other_params": int(other),
        "fp16_checkpoint_bytes": int(2 * n_params),
        "n_configs": len(entries),
        "gguf_per_config_bytes": per_config,
        "gguf_all_bytes": int(sum(per_config)),
        "lora_fp16_bytes": int(lora_fp16),
    }


# -- MiniLM -------------------------------------------------------------------------------------
def run_minilm(bundle: Path, args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from coalora.export.data import load_dataset
    from coalora.runtime.budget import Budget
    from coalora.runtime.engine import Runtime

    t0 = time.perf_counter()
    manifest = json.loads((bundle / MANIFEST).read_text())
    model, loaded, inp, work = torch_side(bundle)
    rt = Runtime.open(bundle, budget="8bits", threads=args.ort_threads, build=False)
    labels = rt.labels
    rec = manifest[Key.TRAINING]
    ds = load_dataset("bbc", "classify")
    limit = rec[Training.OPTIONS].get("limit")
    used = set()
    if limit is not None and len(ds) > limit:
        keep = np.random.default_rng(rec[Training.OPTIONS]["seed"]).permutation(len(ds))[:limit]
        used = {int(i) for i in keep}
    unused = [i for i in range(len(ds)) if i not in used]
    pick = sorted(int(i) for i in np.random.default_rng(2).choice(unused, args.articles, False))
    texts = [ds.texts[i] for i in pick]
    gold = [ds.label_names[ds.labels[i]] for i in pick]
    tok = rt.tokenizer
    limit_len = getattr(rt.arch, "max_position_embeddings", 512)
    tok.enable_truncation(max_length=limit_len)
    encs = [tok.encode(t) for t in texts]
    tok.no_truncation()
    t_load = time.perf_counter() - t0
    entries = pick_entries(rt.pareto, args.minilm_bits, args.minilm_configs)
    rows = []
    for e in entries:
        tc = time.perf_counter()
        activate(rt, Budget.bits(e.bits))
        assert rt.config == e.config
        model.set_configuration(e.config)
        dev_pred, tor_pred, dmax = [], [], []
        for text, enc in zip(texts, encs, strict=True):
            c = rt.classify(text)
            dev_pred.append(c.label)
            p_dev = np.array([c.probs[lb] for lb in labels])
            with torch.no_grad():
                out = model.base(
                    input_ids=torch.tensor([enc.ids]),
                    attention_mask=torch.tensor([enc.attention_mask]),
                    token_type_ids=torch.tensor([enc.type_ids]),
                )
            z = out.logits[0].double().numpy()
            p = np.exp(z - z.max())
            p /= p.sum()
            tor_pred.append(labels[int(p.argmax())])
            dmax.append(float(np.abs(p - p_dev).max()))
        agree = float(np.mean([a == b for a, b in zip(dev_pred, tor_pred, strict=True)]))
        rows.append(
            {
                "bits": e.bits,
                "metric": e.metric,
                "seen_in_training": e.seen_in_training,
                "agreement": agree,
                "device_accuracy": float(
                    np.mean([a == g for a, g in zip(dev_pred, gold, strict=True)])
                ),
                "torch_accuracy": float(
                    np.mean([a == g for a, g in zip(tor_pred, gold, strict=True)])
                ),
                "prob_max_abs": float(np.max(dmax)),
                "prob_mean_of_max_abs": float(np.mean(dmax)),
                "seconds": round(time.perf_counter() - tc, 1),
            }
        )
        r = rows[-1]
        print(
            f"minilm {e.bits:.3f} bits: agreement {agree:.3f}, acc dev {r['device_accuracy']:.3f}"
            f" torch {r['torch_accuracy']:.3f} ({r['seconds']:.0f} s)",
            flush=True,
        )
    rt.close()
    sizes = size_table(bundle, manifest, Runtime.open(bundle, build=False))
    return {
        "bundle": str(bundle),
        "work_dir": str(work),
        "articles": len(pick),
        "article_indices": pick,
        "truncation": limit_len,
        "configs": rows,
        "sizes": sizes,
        "load_s": round(t_load, 1),
    }


# -- report -------------------------------------------------------------------------------------
def summary(res: dict[str, Any]) -> dict[str, Any]:
    """Per model, over its configurations: the device's agreement with torch (top-1 of the
    logits and identical greedy continuations for SmolLM2, predictions for MiniLM) at its
    worst, and the exact path's speed against the fast one."""
    out: dict[str, Any] = {}
    if "smollm2" in res:
        s = res["smollm2"]
        out["smollm2"] = {
            "configurations": len(s["configs"]),
            "min_top1_agreement": min(c["logits_q_head"]["top1_agreement"] for c in s["configs"]),
            "min_identical_continuations": min(c["identical"] for c in s["configs"]),
            "prompts": len(s["prompts"]),
            "exact_over_fast": s["exact_speed"]["exact_over_fast_median"],
        }
    if "minilm" in res:
        m = res["minilm"]
        out["minilm"] = {
            "configurations": len(m["configs"]),
            "min_agreement": min(c["agreement"] for c in m["configs"]),
        }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, default=Path(".cache/demo/smollm2-bbc"))
    p.add_argument("--minilm-bundle", type=Path, default=None)
    p.add_argument("--configs", type=int, default=5, help="stored configurations, spread")
    p.add_argument("--bits", type=float, nargs="*", help="pick the stored ones nearest these")
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--no-lora32", dest="lora32", action="store_false")
    p.add_argument(
        "--no-exact",
        dest="exact",
        action="store_false",
        help="skip the accuracy_level 0 + fp32 LoRA device run (the int8-activation check)",
    )
    p.add_argument("--articles", type=int, default=200)
    p.add_argument("--minilm-configs", type=int, default=4)
    p.add_argument("--minilm-bits", type=float, nargs="*")
    p.add_argument("--ort-threads", type=int, default=1)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "parity.json")
    p.add_argument("--report-only", action="store_true", help="rewrite the .md from the .json")
    args = p.parse_args(argv)
    if args.report_only:
        res = read_result(args.out)
        write_report(res, res["command"], res["wall_s"], args.out.with_suffix(".md"))
        return

    import torch

    torch.set_num_threads(args.torch_threads)
    t0 = time.perf_counter()
    command = "python -m benchmarks.parity " + " ".join(argv if argv is not None else sys.argv[1:])
    res: dict[str, Any] = {"machine": machine(), "command": command}
    prev = json.loads(args.out.read_text()) if args.out.is_file() else {}
    if args.bundle is not None and str(args.bundle) != "none":
        res["smollm2"] = run_smollm2(args.bundle, args)
    elif "smollm2" in prev:
        res["smollm2"] = prev["smollm2"]
    if args.minilm_bundle is not None:
        res["minilm"] = run_minilm(args.minilm_bundle, args)
    wall = time.perf_counter() - t0
    res["wall_s"] = round(wall, 1)
    res = with_summary(res, summary(res))
    args.out.write_text(json.dumps(res, indent=1), encoding="utf-8")
    out_md = args.out.with_suffix(".md")
    write_report(res, command, wall, out_md)
    print(f"wrote {args.out} and {out_md} in {wall:.0f} s")


if __name__ == "__main__":
    main()
