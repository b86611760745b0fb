"""Graph builders against transformers on tiny random models.

Every target linear is quantized with the project's quantizer; the torch model gets the
dequantized weights back (fake quant) and the same LoRA side branch through forward hooks, so
the only differences left are onnxruntime's arithmetic. With accuracy_level=4 MatMulNBits
quantizes activations to int8 per block (~0.4% relative error per matmul), which bounds the
tolerance of those runs; accuracy_level=0 with 4-bit weights runs fp32 activations and must
agree to ~1e-4.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from coalora.kernels.matmulnbits import dequantize
from coalora.kernels.options import DEFAULT_OPTIONS, QuantOption
from coalora.runtime.graphs.llama import LlamaArch, build_decoder
from coalora.runtime.graphs.weights import (
    decoder_weights_from_arrays,
    llama_linear_shapes,
    lora_initializers,
    lora_slots,
    quantize_linears,
    random_lora,
)

PROMPT = [3, 17, 99, 42, 5, 64, 127]
DECODE_STEPS = 5


def _tiny_llama(hidden: int = 96, tied: bool = True, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=128,
        hidden_size=hidden,  # 96: K is not a multiple of 64 or 128 (padded last block)
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,  # GroupQueryAttention needs a multiple of 16
        max_position_embeddings=64,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        tie_word_embeddings=tied,
        attn_implementation="eager",
    )
    model = LlamaForCausalLM(cfg).eval()
    # Random norm weights so a mixed-up norm shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


def _options(kind: str | QuantOption, names: list[str]) -> dict[str, QuantOption]:
    if isinstance(kind, QuantOption):
        return {n: kind for n in names}
    if kind == "4b32":
        return {n: QuantOption(4, 32) for n in names}
    if kind == "mixed":
        per_proj = {
            "q_proj": QuantOption(2, 64),
            "k_proj": QuantOption(8, 32),
            "v_proj": QuantOption(4, 128),
            "o_proj": QuantOption(4, 64),
            "gate_proj": QuantOption(8, 128),
            "up_proj": QuantOption(2, 32),
            "down_proj": QuantOption(4, 32),
        }
        return {n: per_proj[n.rsplit(".", 1)[1]] for n in names}
    rng = np.random.default_rng(7)
    return {n: DEFAULT_OPTIONS[int(rng.integers(len(DEFAULT_OPTIONS)))] for n in names}


def _prepare(
    model: torch.nn.Module,
    kind: str | QuantOption,
    rank: int | None,
    seed: int = 1,
    arch_class: type[LlamaArch] = LlamaArch,
):
    """Quantize, fake-quantize the torch model, attach LoRA hooks; return ONNX inputs."""
    arch = arch_class.from_config(model.config.to_dict())
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    shapes = llama_linear_shapes(arch)
    linears = quantize_linears(arrays, _options(kind, list(shapes)), list(shapes), method="rtn")
    lora = random_lora(shapes, rank, seed=seed, std=0.1) if rank else {}
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, w in linears.items():
            modules[name].weight.copy_(torch.from_numpy(dequantize(w)))
    for name, (a, b) in lora.items():
        a_t, b_t = torch.from_numpy(a), torch.from_numpy(b)

        def hook(_m, inp, out, a_t=a_t, b_t=b_t):
            return out + (inp[0] @ a_t.T) @ b_t.T

        modules[name].register_forward_hook(hook)
    return arch, decoder_weights_from_arrays(arch, arrays, linears), lora


def _session(model_proto, initializers=None, threads: int = 1) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    keep = []
    for name, arr in (initializers or {}).items():
        ov = ort.OrtValue.ortvalue_from_numpy(arr)
        keep.append(ov)
        so.add_initializer(name, ov)
    sess = ort.InferenceSession(
        model_proto.SerializeToString(), so, providers=["CPUExecutionProvider"]
    )
    sess._coalora_keep = keep  # the overrides must outlive session creation
    return sess


def _onnx_generate(sess: ort.InferenceSession, arch: LlamaArch, steps: int, rows=None):
    """Prefill PROMPT then greedy-decode ``steps`` tokens; returns (per-step logits, tokens).
    ``rows``: ids -> (ids onto the fed rows, the rows' feeds), for a graph fed its rows."""
    kv, hd = arch.num_key_value_heads, arch.head_dim
    feeds: dict[str, np.ndarray] = {}
    for i in range(arch.num_hidden_layers):
        for kind in ("key", "value"):
            feeds[f"past_key_values.{i}.{kind}"] = np.zeros((1, kv, 0, hd), np.float32)
    ids = np.array([PROMPT], dtype=np.int64)
    total = len(PROMPT)
    logits_seen, tokens = [], []
    out_names = [o.name for o in sess.get_outputs()]
    for _ in range(steps + 1):
        if rows is not None:
            ids, fed = rows(ids)
            feeds.update(fed)
        feeds["input_ids"] = ids
        feeds["attention_mask"] = np.ones((1, total), dtype=np.int64)
        outs = dict(zip(out_names, sess.run(None, feeds), strict=True))
        logits_seen.append(outs["logits"])
        nxt = int(outs["logits"][0, -1].argmax())
        tokens.append(nxt)
        for i in range(arch.num_hidden_layers):
            for kind in ("key", "value"):
                feeds[f"past_key_values.{i}.{kind}"] = outs[f"present.{i}.{kind}"]
        ids = np.array([[nxt]], dtype=np.int64)
        total += 1
    return logits_seen, tokens


def _torch_generate(model: LlamaForCausalLM, steps: int):
    seq = list(PROMPT)
    logits_seen, tokens = [], []
    with torch.no_grad():
        for step in range(steps + 1):
            logits = model(torch.tensor([seq])).logits.numpy()
            logits_seen.append(logits if step == 0 else logits[:, -1:])
            nxt = int(logits[0, -1].argmax())
            tokens.append(nxt)
            seq.append(nxt)
    return logits_seen, tokens


def _max_diff(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


@pytest.mark.parametrize(
    ("kind", "rank", "tied", "head", "lora_bits"),
    [
        ("4b32", 8, True, None, 32),
        ("mixed", 4, False, None, 8),
        ("random", 16, True, QuantOption(8, 32), 8),
    ],
)
def test_llama_decoder_matches_transformers(kind, rank, tied, head, lora_bits) -> None:
    model = _tiny_llama(tied=tied)
    arch, weights, lora = _prepare(model, kind, rank)
    weights.lora = lora
    proto = build_decoder(arch, weights, lora_rank=rank, quantize_lm_head=head, lora_bits=lora_bits)
    got, got_tokens = _onnx_generate(_session(proto), arch, DECODE_STEPS)
    if head is not None:
        # The torch head gets the same quantized weights the graph multiplies by.
        from coalora.kernels.matmulnbits import to_matmulnbits
        from coalora.kernels.quantize import quantize_rtn

        src = model.lm_head.weight.detach().numpy()
        deq = dequantize(to_matmulnbits(quantize_rtn(src, head)))
        model.lm_head.weight = torch.nn.Parameter(torch.from_numpy(deq))
    want, want_tokens = _torch_generate(model, DECODE_STEPS)
    diff = _max_diff(got, want)
    scale = max(float(np.abs(w).max()) for w in want)
    print(
        f"{kind} rank={rank} tied={tied} head={head}: max|diff|={diff:.2e} (|logits|<={scale:.2f})"
    )
    assert got_tokens == want_tokens
    assert diff < 0.03 * scale


def test_quantized_embedding_and_head() -> None:
    """Tied model with the table stored once per option: GatherBlockQuantized + MatMulNBits."""
    from coalora.kernels.matmulnbits import to_matmulnbits
    from coalora.kernels.quantize import quantize_rtn

    model = _tiny_llama(tied=True, seed=4)
    arch, weights, lora = _prepare(model, "mixed", 4)
    weights.lora = lora
    for emb_opt, head_opt in [
        (QuantOption(4, 64), QuantOption(4, 64)),
        (QuantOption(8, 128), None),
    ]:
        proto = build_decoder(
            arch, weights, lora_rank=4, quantize_lm_head=head_opt, quantize_embedding=emb_opt
        )
        ops = {n.op_type for n in proto.graph.node}
        assert "GatherBlockQuantized" in ops and ("Gemm" in ops) == (head_opt is None)
        got, got_tokens = _onnx_generate(_session(proto), arch, DECODE_STEPS)
        table = model.model.embed_tokens.weight.detach().numpy().copy()
        deq = dequantize(to_matmulnbits(quantize_rtn(table, emb_opt)))
        with torch.no_grad():
            model.model.embed_tokens.weight.copy_(torch.from_numpy(deq))  # tied: head too
            if head_opt is None:
                model.lm_head.weight = torch.nn.Parameter(torch.from_numpy(table))
        want, want_tokens = _torch_generate(model, DECODE_STEPS)
        with torch.no_grad():
            model.model.embed_tokens.weight.copy_(torch.from_numpy(table))
            model.lm_head.weight = model.model.embed_tokens.weight
        scale = max(float(np.abs(w).max()) for w in want)
        assert got_tokens == want_tokens
        assert _max_diff(got, want) < 0.03 * scale


def test_the_embedding_gathers_the_quantized_heads_rows_fed_per_run() -> None:
    """A tied model with a quantized head: the graph holds no table at all (no fp32 one, no
    second set of codes); each run is fed just its tokens' rows of the head's own arrays,
    with ``input_ids`` indexing them, and decodes as torch with that table."""
    from coalora.kernels.matmulnbits import to_matmulnbits
    from coalora.kernels.quantize import quantize_rtn
    from coalora.runtime.graphs.llama import EMBED_ROWS, embedding_rows

    model = _tiny_llama(tied=True, seed=5)
    arch, weights, lora = _prepare(model, "mixed", 4)
    weights.lora = lora
    table = model.model.embed_tokens.weight.detach().numpy().copy()
    weights.lm_head = to_matmulnbits(quantize_rtn(table, QuantOption(8, 32)))
    external: dict[str, np.ndarray] = {}
    proto = build_decoder(arch, weights, lora_rank=4, embedding_from_head=True, external=external)
    ops = [n.op_type for n in proto.graph.node]
    assert "GatherBlockQuantized" in ops and "Gemm" not in ops
    names = {t.name for t in proto.graph.initializer} | set(external)
    assert not any(n.startswith("model.embed_tokens") for n in names)
    assert set(EMBED_ROWS) <= {i.name for i in proto.graph.input}
    full = embedding_rows(weights.lm_head, arch.vocab_size, arch.hidden_size)
    assert all(
        np.shares_memory(f, a)
        for f, a in zip(
            full,
            (weights.lm_head.b, weights.lm_head.scales, weights.lm_head.zero_points),
            strict=True,
        )
    )
    fed_counts: list[int] = []

    def rows(ids: np.ndarray):
        uniq, index = np.unique(ids, return_inverse=True)
        fed_counts.append(len(uniq))
        return index.reshape(ids.shape), {
            n: np.ascontiguousarray(f[uniq]) for n, f in zip(EMBED_ROWS, full, strict=True)
        }

    from coalora.runtime.session import create_session

    built = create_session(proto, threads=1, initializers=external)
    got, got_tokens = _onnx_generate(built.session, arch, DECODE_STEPS, rows=rows)
    assert fed_counts[0] == len(set(PROMPT)) and set(fed_counts[1:]) == {1}
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(torch.from_numpy(dequantize(weights.lm_head)))
    want, want_tokens = _torch_generate(model, DECODE_STEPS)
    scale = max(float(np.abs(w).max()) for w in want)
    assert got_tokens == want_tokens
    assert _max_diff(got, want) < 0.03 * scale
    weights.lm_head = None
    with pytest.raises(ValueError, match="tied model with a quantized head"):
        build_decoder(arch, weights, lora_rank=4, embedding_from_head=True)


@pytest.mark.parametrize("kind", ["4b32", "mixed"])
def test_llama_decoder_accuracy_level0_is_tight(kind: str) -> None:
    """The exact graph: 4-bit matrices on MatMulNBits' fp32 kernel, 2- and 8-bit ones (no such
    kernel) as fp32 MatMul of the dequantized weight; both as tight as fp32 allows."""
    model = _tiny_llama(hidden=64, tied=False, seed=3)
    arch, weights, lora = _prepare(model, kind, 8)
    weights.lora = lora
    proto = build_decoder(arch, weights, lora_rank=8, accuracy_level=0, fuse_qkv=False)
    dequantized = [n for n in proto.graph.node if n.op_type == "MatMul" and "lora" not in n.name]
    bits = {w.bits for w in weights.linears.values()}
    assert len(dequantized) == sum(w.bits != 4 for w in weights.linears.values())
    assert bool(dequantized) == (bits != {4})
    got, got_tokens = _onnx_generate(_session(proto), arch, DECODE_STEPS)
    want, want_tokens = _torch_generate(model, DECODE_STEPS)
    diff = _max_diff(got, want)
    print(f"accuracy_level=0 {kind}: max|diff|={diff:.2e}")
    assert got_tokens == want_tokens
    assert diff < 2e-4


def test_lora_initializers_override_at_session_creation() -> None:
    """A graph built with zero LoRA takes the adapter through add_initializer, fused or not."""
    model = _tiny_llama(seed=5)
    arch, weights, lora = _prepare(model, "4b32", 4, seed=9)
    want, _ = _torch_generate(model, 2)
    for fuse, bits in ((True, 8), (False, 32)):
        proto = build_decoder(
            arch, weights, lora_rank=4, fuse_qkv=fuse, fuse_gate_up=fuse, lora_bits=bits
        )
        slots = lora_slots(proto)
        assert {m for s in slots for m in s.members} == set(lora)
        assert any(len(s.members) > 1 for s in slots) == fuse
        plain, _ = _onnx_generate(_session(proto), arch, 2)
        got, _ = _onnx_generate(_session(proto, lora_initializers(slots, lora)), arch, 2)
        scale = max(float(np.abs(w).max()) for w in want)
        assert _max_diff(got, want) < 0.03 * scale
        assert _max_diff(plain, want) > 0.1 * _max_diff(got, want)


def test_llama_arch_from_smollm2_config() -> None:
    cfg = {
        "vocab_size": 49152,
        "hidden_size": 576,
        "intermediate_size": 1536,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "rms_norm_eps": 1e-5,
        "rope_theta": 100000,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
    }
    arch = LlamaArch.from_config(cfg)
    assert arch.head_dim == 64 and arch.rope_theta == 100000.0 and arch.tie_word_embeddings
    cos, sin = arch.rope_cache(16)
    assert cos.shape == sin.shape == (16, 32)


def test_shared_past_present_buffer_matches() -> None:
    """One preallocated cache per layer bound as both past and present (IO binding) gives
    the same logits as feeding present back as past."""
    model = _tiny_llama(seed=2)
    arch, weights, lora = _prepare(model, "mixed", 4)
    weights.lora = lora
    sess = _session(build_decoder(arch, weights, lora_rank=4, max_seq_len=64))
    want, _ = _onnx_generate(sess, arch, DECODE_STEPS)
    caches = [f"{i}.{k}" for i in range(arch.num_hidden_layers) for k in ("key", "value")]
    binding = sess.io_binding()
    binding.bind_output("logits", "cpu")  # first: outputs come back in binding order
    shape = (1, arch.num_key_value_heads, 32, arch.head_dim)
    bufs = {c: ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.float32)) for c in caches}
    for c, buf in bufs.items():
        binding.bind_ortvalue_input(f"past_key_values.{c}", buf)
        binding.bind_ortvalue_output(f"present.{c}", buf)
    ids = np.array([PROMPT], dtype=np.int64)
    mask = np.ones((1, 32), dtype=np.int64)
    total, got = len(PROMPT), []
    for _ in range(DECODE_STEPS + 1):
        binding.bind_output("logits", "cpu")
        binding.bind_cpu_input("input_ids", ids)
        binding.bind_cpu_input("attention_mask", mask[:, :total])
        sess.run_with_iobinding(binding)
        got.append(binding.get_outputs()[0].numpy())
        ids = np.array([[int(got[-1][0, -1].argmax())]], dtype=np.int64)
        total += 1
    assert _max_diff(got, want) < 1e-5


def _tiny_bert(seed: int = 0):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=128,
        hidden_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=160,
        max_position_embeddings=32,
        type_vocab_size=2,
        num_labels=3,
        attn_implementation="eager",
    )
    model = BertForSequenceClassification(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "LayerNorm" in name or name.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
        # O(1) logits instead of ~0.1, so the comparison means something.
        model.classifier.weight.mul_(30.0)
    return model


@pytest.mark.parametrize(("kind", "level"), [("mixed", 4), ("4b32", 0)])
def test_bert_classifier_matches_transformers(kind, level) -> None:
    from coalora.runtime.graphs.bert import BertArch, BertWeights, build_bert_classifier

    model = _tiny_bert()
    arch = BertArch.from_config(model.config.to_dict())
    arrays = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    shapes = arch.linear_shapes()
    if kind == "mixed":
        cycle = [QuantOption(2, 32), QuantOption(4, 64), QuantOption(8, 128), QuantOption(4, 32)]
        options = {n: cycle[j % len(cycle)] for j, n in enumerate(shapes)}
    else:
        options = {n: QuantOption(4, 32) for n in shapes}
    linears = quantize_linears(arrays, options, list(shapes), method="rtn")
    lora = random_lora(shapes, 4, seed=3, std=0.1)
    modules = dict(model.named_modules())
    with torch.no_grad():
        for name, w in linears.items():
            modules[name].weight.copy_(torch.from_numpy(dequantize(w)))
    for name, (a, b) in lora.items():
        a_t, b_t = torch.from_numpy(a), torch.from_numpy(b)
        modules[name].register_forward_hook(
            lambda _m, inp, out, a_t=a_t, b_t=b_t: out + (inp[0] @ a_t.T) @ b_t.T
        )
    proto = build_bert_classifier(
        arch, BertWeights(arrays, linears), lora_rank=4, accuracy_level=level
    )
    sess = _session(proto, lora_initializers(lora_slots(proto), lora))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 128, (2, 9), dtype=np.int64)
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # a padded row
    types = np.zeros_like(ids)
    types[:, 5:] = 1
    (got,) = sess.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": types})
    with torch.no_grad():
        want = model(
            input_ids=torch.from_numpy(ids),
            attention_mask=torch.from_numpy(mask),
            token_type_ids=torch.from_numpy(types),
        ).logits.numpy()
    diff = float(np.abs(got - want).max())
    print(f"bert {kind} level={level}: max|diff|={diff:.2e} (|logits|<={np.abs(want).max():.2f})")
    assert got.shape == (2, 3)
    assert diff < (2e-4 if level == 0 else 0.03 * float(np.abs(want).max()))


def test_lora_slot_layout_and_8bit_storage() -> None:
    """Fused slot: A side by side, B block diagonal; 8-bit storage keeps same-sign rows."""
    from coalora.runtime.graphs.weights import LoraSlot

    rng = np.random.default_rng(0)
    adapters = {
        "q": (rng.standard_normal((4, 96)).astype(np.float32), np.abs(rng.random((128, 4)))),
        "k": (rng.standard_normal((4, 96)).astype(np.float32), -np.abs(rng.random((64, 4)))),
    }
    slot = LoraSlot("qk", ("q", "k"), 96, (128, 64), 4)
    a, b = slot.dense(adapters, scale=2.0)
    x = rng.standard_normal((3, 96)).astype(np.float32)
    want = np.concatenate([2.0 * x @ adapters[n][0].T @ adapters[n][1].T for n in ("q", "k")], 1)
    np.testing.assert_allclose(x @ a @ b, want, rtol=1e-5, atol=1e-5)
    wa, wb = LoraSlot("qk", ("q", "k"), 96, (128, 64), 4, bits=8).quantized(adapters, 2.0)
    got = x @ dequantize(wa).T @ dequantize(wb).T
    assert np.abs(got - want).max() < 0.01 * np.abs(want).max()
    assert LoraSlot.from_json(slot.to_json()) == slot


def _built(arch, weights, *, rank, lora_bits=8, fuse=True, last=False, head=None):
    """The decoder built with its large initializers outside the proto (as the runtime does)."""
    from coalora.runtime.mapped import Scratch

    external: dict[str, np.ndarray] = {}
    scratch = Scratch()
    proto = build_decoder(
        arch,
        weights,
        lora_rank=rank,
        lora_bits=lora_bits,
        quantize_lm_head=head,
        fuse_qkv=fuse,
        fuse_gate_up=fuse,
        external=external,
        scratch=scratch,
        last_logits=last,
    )
    return proto, external, scratch


@pytest.mark.parametrize("kind", ["mixed", "random"])
def test_external_initializers_equal_embedded_and_survive_release(kind) -> None:
    """Weights left out of the proto and handed over in place give the same logits as the
    self-contained graph, also after the scratch pages (fused weights, packed LoRA) are given
    back. Where onnxruntime prepacks (x86-64, ARM with dot product) it never reads them again;
    where it does not (Cortex-A72) the pages reload from the scratch file."""
    from onnx import TensorProto

    from coalora.runtime.graphs._onnx import MIN_EXTERNAL_BYTES
    from coalora.runtime.session import create_session

    model = _tiny_llama(seed=4)
    arch, weights, lora = _prepare(model, kind, 4, seed=2)
    weights.lora = lora
    want, want_tokens = _onnx_generate(
        _session(build_decoder(arch, weights, lora_rank=4, lora_bits=8)), arch, 3
    )
    proto, external, scratch = _built(arch, weights, rank=4)
    for t in proto.graph.initializer:
        assert t.data_location == TensorProto.EXTERNAL or len(t.raw_data) < MIN_EXTERNAL_BYTES
    assert scratch.nbytes > 0 and any(n.startswith("lora.") for n in external)
    built = create_session(proto, threads=1, initializers=external)
    assert built.proto_bytes < 100_000 and built.external_bytes == sum(
        a.nbytes for a in external.values()
    )
    got, got_tokens = _onnx_generate(built.session, arch, 3)
    assert got_tokens == want_tokens and _max_diff(got, want) == 0.0
    scratch.release()
    computed = [n for n in external if n.startswith("lora.") or ("qkv_proj" in n or "gate_up" in n)]
    assert computed
    again, _ = _onnx_generate(built.session, arch, 3)
    assert _max_diff(again, want) == 0.0


def test_external_initializers_must_all_be_served() -> None:
    from coalora.runtime.session import create_session

    model = _tiny_llama(seed=6)
    arch, weights, _ = _prepare(model, "4b32", 4)
    proto, external, _ = _built(arch, weights, rank=4)
    name = next(iter(external))
    missing = dict(external)
    del missing[name]
    with pytest.raises(ValueError, match="no array for the graph's external initializer"):
        create_session(proto, threads=1, initializers=missing)
    proto, external, _ = _built(arch, weights, rank=4)
    with pytest.raises(ValueError, match="no external initializer 'nope'"):
        create_session(proto, threads=1, initializers={**external, "nope": external[name]})


@pytest.mark.parametrize("head", [None, QuantOption(8, 32)])
def test_last_logits_are_the_last_row(head) -> None:
    """``last_logits`` runs the LM head on the last position only (fp32 and quantized heads)."""
    model = _tiny_llama(seed=7, tied=head is None)
    arch, weights, lora = _prepare(model, "4b32", 4)
    weights.lora = lora
    full = build_decoder(arch, weights, lora_rank=4, quantize_lm_head=head)
    last = build_decoder(arch, weights, lora_rank=4, quantize_lm_head=head, last_logits=True)
    want, want_tokens = _onnx_generate(_session(full), arch, 3)
    got, got_tokens = _onnx_generate(_session(last), arch, 3)
    assert got_tokens == want_tokens
    assert all(g.shape == (1, 1, arch.vocab_size) for g in got)
    assert _max_diff(got, [w[:, -1:] for w in want]) < 1e-5
