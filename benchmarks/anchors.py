"""The peers the speed benchmarks run beside ours, each built offline from the same weights.

- llama.cpp (llama-cpp-python) on the package's GGUF, alone or with a LoRA GGUF of rank r on
  every matrix we adapt (llama.cpp's ``--lora`` path; random values: speed does not depend on
  them);
- onnxruntime-genai on its own int4 model, made by its model builder from the same weights
  (the package's GGUF dequantized into a Hugging Face folder, then
  ``python -m onnxruntime_genai.models.builder -p int4 -e cpu``).

Each engine is one callable, ``run(ids) -> {"ttft_ms", "decode_tok_s", "tokens"}``, that
decodes exactly ``new_tokens`` greedy tokens after ``ids`` with EOS ignored, as ours does in
``runtime_speed``. Everything built is cached under ``.cache/bench``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import ROOT

BENCH_CACHE = ROOT / ".cache" / "bench"
# llama.cpp's names of the matrices the bundle adapts (LLaMA family), per block
LORA_TENSORS = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")

Run = Callable[[list[int]], dict[str, float]]


# ------------------------------------------------------------------------ llama.cpp
def lora_gguf(base: Path, out: Path, rank: int, alpha: float, seed: int = 0) -> Path:
    """A llama.cpp LoRA adapter GGUF of rank ``rank`` on every matrix of ``LORA_TENSORS``,
    shaped from ``base``'s tensors (f32, as our side branch computes)."""
    import gguf

    if out.is_file():
        return out
    reader = gguf.GGUFReader(str(base))
    arch = str(bytes(reader.fields["general.architecture"].parts[-1]), "utf-8")
    rng = np.random.default_rng(seed)
    tmp = out.with_name(out.name + ".part")
    writer = gguf.GGUFWriter(str(tmp), arch)
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, float(alpha))
    n = 0
    for t in reader.tensors:
        stem = t.name.removesuffix(".weight")
        if stem.split(".")[-1] not in LORA_TENSORS:
            continue
        n_in, n_out = (int(d) for d in t.shape[:2])  # GGUF order: (in, out)
        a = (rng.standard_normal((rank, n_in)) / np.sqrt(n_in)).astype(np.float32)
        b = (rng.standard_normal((n_out, rank)) * 1e-3).astype(np.float32)
        writer.add_tensor(f"{stem}.weight.lora_a", a)
        writer.add_tensor(f"{stem}.weight.lora_b", b)
        n += 1
    if not n:
        raise SystemExit(f"{base}: no tensor named like {', '.join(LORA_TENSORS)}")
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.replace(out)
    return out


def llama_cpp_engine(
    gguf_file: Path, threads: int, context: int, new_tokens: int, lora: Path | None = None
) -> Run:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(gguf_file),
        n_threads=threads,
        n_ctx=context,
        verbose=False,
        seed=0,
        lora_path=None if lora is None else str(lora),
    )

    def run(ids: list[int]) -> dict[str, float]:
        llm.reset()  # no prefix reuse between runs: every run prefills the whole prompt
        t0 = time.perf_counter()
        gen = llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0)
        next(gen)
        t1 = time.perf_counter()
        n = 1
        for _ in gen:
            n += 1
            if n == new_tokens:
                break
        t2 = time.perf_counter()
        gen.close()
        return {"ttft_ms": 1e3 * (t1 - t0), "decode_tok_s": (n - 1) / (t2 - t1), "tokens": n}

    run.llm = llm  # type: ignore[attr-defined]
    return run


# ------------------------------------------------------------------------ onnxruntime-genai
def ort_genai_model(model: str, out: Path | None = None) -> Path:
    """onnxruntime-genai's int4 CPU model of ``model`` (a name ``coalora.export.models``
    loads offline), built once by its own model builder; each step in its own process, so
    torch never enters the measuring one."""
    out = out or BENCH_CACHE / f"{model}-ortgenai-int4"
    if (out / "genai_config.json").is_file():
        return out
    hf = BENCH_CACHE / f"{model}-hf"
    if not (hf / "config.json").is_file():
        code = (
            "from coalora.export.models import load_model; import sys; "
            f"m = load_model({model!r}); m.model.save_pretrained(sys.argv[1]); "
            "m.tokenizer.save_pretrained(sys.argv[1])"
        )
        _quiet([sys.executable, "-c", code, str(hf)])
    tmp = out.with_name(out.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    _quiet(
        [
            sys.executable,
            "-m",
            "onnxruntime_genai.models.builder",
            "-m",
            model,
            "-i",
            str(hf),
            "-o",
            str(tmp),
            "-p",
            "int4",
            "-e",
            "cpu",
            "-c",
            str(BENCH_CACHE / "ortgenai-cache"),
        ]
    )
    shutil.rmtree(out, ignore_errors=True)
    tmp.replace(out)
    return out


def _quiet(cmd: list[str]) -> None:
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if res.returncode:
        tail = (res.stderr or res.stdout).strip().splitlines()[-5:]
        raise SystemExit(f"{' '.join(cmd[:4])} failed:\n" + "\n".join(tail))


def ort_genai_engine(path: Path, threads: int, new_tokens: int) -> Run:
    import onnxruntime_genai as og

    cfg = og.Config(str(path))
    options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
    cfg.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
    model = og.Model(cfg)

    def run(ids: list[int]) -> dict[str, float]:
        params = og.GeneratorParams(model)
        total = len(ids) + new_tokens
        params.set_search_options(max_length=total, min_length=total, do_sample=False)
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(ids)  # prefill and the first token's logits
        gen.generate_next_token()
        t1 = time.perf_counter()
        n = 1
        while not gen.is_done():
            gen.generate_next_token()
            n += 1
        t2 = time.perf_counter()
        return {"ttft_ms": 1e3 * (t1 - t0), "decode_tok_s": (n - 1) / (t2 - t1), "tokens": n}

    return run


# ------------------------------------------------------------------------ random GGUFs
def _blocks(rng: np.random.Generator, rows: int, cols: int, qtype: Any) -> np.ndarray:
    """``rows`` x ``cols`` weights of a ggml block type with random codes and small positive
    fp16 scales (finite everywhere, so every kernel runs its ordinary path)."""
    import gguf

    per_block, nbytes = gguf.GGML_QUANT_SIZES[qtype]
    n = rows * (cols // per_block)
    out = rng.integers(0, 256, (n, nbytes), dtype=np.uint8)
    scales = (rng.random(n, dtype=np.float32) * 0.01 + 1e-3).astype(np.float16)
    out[:, :2] = scales.view(np.uint8).reshape(n, 2)
    if qtype == gguf.GGMLQuantizationType.Q4_1:  # the block minimum, fp16 too
        out[:, 2:4] = (-scales * 8).view(np.uint8).reshape(n, 2)
    return out.reshape(rows, -1)


def random_llama_gguf(
    out: Path, cfg: dict[str, Any], tokenizer_gguf: Path, qtype_name: str
) -> Path:
    """A llama.cpp GGUF of ``cfg``'s LLaMA shapes (a Hugging Face config dict, tied embedding)
    with random ``qtype_name`` linears (Q4_0, Q4_1, Q8_0), a Q8_0 embedding (the LM head, as
    ours is 8-bit) and the tokenizer of ``tokenizer_gguf``, padded to the vocabulary."""
    import gguf

    if out.is_file():
        return out
    q = gguf.GGMLQuantizationType[qtype_name]
    h, ffn, vocab = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or h // heads
    src = gguf.GGUFReader(str(tokenizer_gguf))

    def strings(key: str) -> list[str]:
        f = src.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    tokens = strings("tokenizer.ggml.tokens")
    ttype = src.fields["tokenizer.ggml.token_type"]
    types = [int(ttype.parts[i][0]) for i in ttype.data]
    pad = vocab - len(tokens)
    tokens += [f"<|unused{i}|>" for i in range(pad)]
    types += [int(gguf.TokenType.UNUSED)] * pad
    tmp = out.with_name(out.name + ".part")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_context_length(cfg.get("max_position_embeddings", 4096))
    w.add_embedding_length(h)
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-5)))
    w.add_vocab_size(vocab)
    w.add_tokenizer_model(str(bytes(src.fields["tokenizer.ggml.model"].parts[-1]), "utf-8"))
    w.add_tokenizer_pre(str(bytes(src.fields["tokenizer.ggml.pre"].parts[-1]), "utf-8"))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(strings("tokenizer.ggml.merges"))
    for key, add in (("bos", w.add_bos_token_id), ("eos", w.add_eos_token_id)):
        add(int(src.fields[f"tokenizer.ggml.{key}_token_id"].parts[-1][0]))
    rng = np.random.default_rng(0)
    q8 = gguf.GGMLQuantizationType.Q8_0
    w.add_tensor("token_embd.weight", _blocks(rng, vocab, h, q8), raw_dtype=q8)
    ones = np.ones(h, np.float32)
    shapes = {
        "attn_q": (heads * head_dim, h),
        "attn_k": (kv * head_dim, h),
        "attn_v": (kv * head_dim, h),
        "attn_output": (h, heads * head_dim),
        "ffn_gate": (ffn, h),
        "ffn_up": (ffn, h),
        "ffn_down": (h, ffn),
    }
    for i in range(cfg["num_hidden_layers"]):
        w.add_tensor(f"blk.{i}.attn_norm.weight", ones)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", ones)
        for name, (rows, cols) in shapes.items():
            w.add_tensor(f"blk.{i}.{name}.weight", _blocks(rng, rows, cols, q), raw_dtype=q)
    w.add_tensor("output_norm.weight", ones)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    tmp.replace(out)
    return out
