"""The two sides the parity check compares: the torch ``CoALoRAModel`` rebuilt exactly as
the export built it, and the device's own greedy loop; the prompts both are given."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path
from typing import Any

import numpy as np

from coalora.runtime.format.spec import MANIFEST, Arch, Key, Training

CHAT_PROMPTS = (
    "What is the capital of France?",
    "Give me three tips for staying healthy.",
    "Explain what a central bank does in two sentences.",
    "Who won the football match last night?",
    "Write a short headline about a new smartphone launch.",
    "Why do interest rates affect house prices?",
    "Summarise the main causes of inflation.",
    "What is the difference between weather and climate?",
    "Suggest a name for a new technology start-up.",
    "How does a general election work in the UK?",
)
N_BBC_PROMPTS = 10
BBC_PROMPT_WORDS = 30


# -- rebuilding the torch side exactly as the export did --------------------------------------
def export_options(manifest: dict[str, Any], bundle: Path) -> Any:
    """The ``ExportOptions`` the bundle was trained with (from the manifest's training record)."""
    from coalora.export.options import ExportOptions

    rec = manifest[Key.TRAINING]
    known = {f.name for f in fields(ExportOptions)}
    values = {k: v for k, v in rec[Training.OPTIONS].items() if k in known and k != "model"}
    values["options"] = tuple(values.get("options", ()))
    lm_head = manifest[Key.ARCHITECTURE].get(Arch.LM_HEAD)
    return ExportOptions(
        model=rec[Training.MODEL], out=bundle, lm_head=lm_head, progress=False, **values
    )


def torch_side(bundle: Path) -> tuple[Any, Any, Any, Path]:
    """(CoALoRAModel with the checkpoint's adapter, LoadedModel, Inputs, work dir)."""
    from coalora.export.coa_lora import CoALoRAConfig, CoALoRAModel
    from coalora.export.coa_lora.train import load_checkpoint
    from coalora.export.inputs import load_data, load_for_training
    from coalora.export.phases import cached_calibration
    from coalora.export.workdir import CALIBRATION_FILE, work_dir_for

    manifest = json.loads((bundle / MANIFEST).read_text())
    opts = export_options(manifest, bundle)
    inp = load_for_training(opts, load_data(opts))
    if inp.fingerprint != manifest[Key.TRAINING][Training.DATA][Training.DATA_SHA256]:
        raise SystemExit("the data differs from what the bundle was trained on")
    work = work_dir_for(opts, inp)
    calib = work / CALIBRATION_FILE
    if not calib.is_file():
        raise SystemExit(f"no cached calibration in {work}: the work dir is gone")
    moments, _ = cached_calibration(inp.loaded, [], opts.calib_len, calib, False)
    cfg = CoALoRAConfig.from_dict(manifest[Key.TRAINING][Training.COALORA])
    model = CoALoRAModel(
        inp.loaded.model,
        inp.space,
        cfg,
        kind=inp.loaded.kind,
        importance=moments,
        method=opts.quantizer,
    )
    load_checkpoint(work / "train" / "checkpoint", model)
    model.eval()
    return model, inp.loaded, inp, work


def pick_entries(pareto: Any, wanted: list[float] | None, n: int) -> list[Any]:
    entries = sorted(pareto.entries, key=lambda e: e.bits)
    if wanted:
        return [min(entries, key=lambda e: abs(e.bits - b)) for b in wanted]
    if len(entries) <= n:
        return entries
    idx = np.unique(np.round(np.linspace(0, len(entries) - 1, n)).astype(int))
    return [entries[i] for i in idx]


def activate(rt: Any, budget: Any) -> None:
    """Build the session for ``budget`` (the first time, after ``open(build=False)``), or
    switch to it."""
    if rt._built is None:
        rt._selection = rt.choose(budget)
        rt.build()
    else:
        rt.switch(budget)


def check_codes(model: Any, rt: Any, config: Any, names: list[str]) -> float:
    """Max |torch dequantized weight - bundle codes dequantized| over a few matrices."""
    from coalora.kernels.matmulnbits import dequantize

    linears = rt._mapped.linears(config)
    worst = 0.0
    for name in names:
        w_t = model.layers[name].quantized_weight(config[name]).numpy()
        w_d = dequantize(linears[name])[: w_t.shape[0], : w_t.shape[1]]
        worst = max(worst, float(np.abs(w_t - w_d).max()))
    return worst


def check_adapter(model: Any, rt: Any, config: Any) -> float:
    """Max relative difference of the folded A' (θ in torch vs θ as ONNX on the device)."""
    dev, _ = rt._adapters(config)
    ref = model.adapter_for(config)
    worst = 0.0
    for name, (a, _b, _s) in ref.items():
        worst = max(worst, float(np.abs(dev[name][0] - a).max() / (np.abs(a).max() + 1e-12)))
    return worst


# -- SmolLM2 ------------------------------------------------------------------------------------
def lm_prompts(rt: Any, bundle_manifest: dict[str, Any]) -> list[tuple[str, list[int]]]:
    """10 openings of BBC articles the export never used (plain continuation) + 10 chat
    questions (the bundle's chat format); token ids from the bundle's tokenizer."""
    from coalora.export.data import load_dataset

    rec = bundle_manifest[Key.TRAINING]
    ds = load_dataset("bbc", "lm")
    used = set()
    limit = rec[Training.OPTIONS].get("limit")
    if limit is not None and len(ds) > limit:
        keep = np.random.default_rng(rec[Training.OPTIONS]["seed"]).permutation(len(ds))[:limit]
        used = {int(i) for i in keep}
    unused = [i for i in range(len(ds)) if i not in used]
    pick = np.random.default_rng(1).choice(unused, N_BBC_PROMPTS, replace=False)
    out = []
    for i in pick:
        words = ds.texts[int(i)].split()[:BBC_PROMPT_WORDS]
        text = " ".join(words)
        out.append((f"bbc[{int(i)}]: {text[:60]}...", rt.encode_prompt(text, chat=False)))
    for q in CHAT_PROMPTS:
        out.append((f"chat: {q}", rt.encode_prompt(q, chat=True)))
    return out


def device_greedy(rt: Any, ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy tokens (EOS not special: always ``n``) and the logits each was chosen from
    [n, vocab], on the runtime's own KV decoder (the loop ``generate_ids`` runs)."""
    dec = rt._decoder
    total = len(ids)
    logits = dec.run(np.asarray([ids], dtype=np.int64), total).copy()
    toks, rows = [], []
    for step in range(n):
        rows.append(logits)
        t = int(np.argmax(logits))
        toks.append(t)
        if step + 1 == n:
            break
        total += 1
        logits = dec.run(np.asarray([[t]], dtype=np.int64), total).copy()
    return toks, np.stack(rows)


def torch_greedy(model: Any, ids: list[int], n: int) -> list[int]:
    import torch
    from transformers import DynamicCache

    base = model.base
    cache = DynamicCache()
    x = torch.tensor([ids])
    toks = []
    with torch.no_grad():
        for _step in range(n):
            out = base(input_ids=x, past_key_values=cache, use_cache=True)
            t = int(out.logits[0, -1].argmax())
            toks.append(t)
            x = torch.tensor([[t]])
    return toks


def torch_forced_logits(
    model: Any, ids: list[int], cont: list[int], heads: dict[str, Any]
) -> dict[str, np.ndarray]:
    """Logits (per head) at the positions that predicted each token of ``cont`` [n, vocab]."""
    import torch

    seq = torch.tensor([ids + cont[:-1]])
    with torch.no_grad():
        h = model.base.model(input_ids=seq).last_hidden_state[0, len(ids) - 1 :]
        return {k: (h @ w.T).numpy() for k, w in heads.items()}


def first_divergence(a: list[int], b: list[int]) -> int:
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            return i
    return len(a)
