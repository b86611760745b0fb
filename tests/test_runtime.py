"""End to end on the tiny bundles: select, generate adapters, build, decode, switch, classify."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from coalora.runtime import assemble
from coalora.runtime.adapter import ThetaRunner, fold
from coalora.runtime.budget import BudgetError
from coalora.runtime.engine import Runtime, RuntimeInputError
from coalora.runtime.format.theta import ThetaVocab
from coalora.runtime.profiles import ProfileError
from coalora.runtime.sampling import SamplingParams
from coalora.runtime.selection import SelectionError
from coalora.runtime.table_rows import reads_fed_rows

LOW, HIGH = "4bits", "6bits"
PROMPT_IDS = [5, 9, 17, 33, 8, 12]


@pytest.fixture(scope="module")
def low(tiny_llama_bundle: Path) -> Runtime:
    return Runtime.open(tiny_llama_bundle, budget=LOW, threads=1, context_length=64)


@pytest.fixture(scope="module")
def high(tiny_llama_bundle: Path) -> Runtime:
    return Runtime.open(tiny_llama_bundle, budget=HIGH, threads=1, context_length=64)


@pytest.fixture(scope="module")
def bert(tiny_bert_bundle: Path) -> Runtime:
    return Runtime.open(tiny_bert_bundle, budget="10bits", threads=1)


def _reference_session(rt: Runtime, with_adapter: bool, **graph: int) -> ort.InferenceSession:
    """The same graph (fused q/k/v and gate/up, as the runtime builds it) the plain way:
    weights and the adapter embedded in the proto."""
    b = rt.bundle
    adapters = None
    if with_adapter:
        vocab = ThetaVocab.from_dict(b.theta_vocab)
        theta = ThetaRunner(str(b.theta_path()), b.theta_inputs)
        u = theta(vocab.encode(rt.config, b.space))
        lora = b.lora_tensors()
        names = [m.name for m in b.space.matrices]
        a = {n: lora[f"{n}.A"] for n in names}
        bb = {n: lora[f"{n}.B"] for n in names}
        adapters = fold(names, u, a, bb, b.lora_scale)
    proto, _ = assemble.build_graph(
        assemble.MappedBundle(b),
        rt.arch,
        rt.config,
        context_length=64,
        adapters=adapters,
        fuse=True,
        **graph,
    )
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _greedy(sess: ort.InferenceSession, rt: Runtime, ids: list[int], steps: int):
    """Plain numpy-feed decoding loop: present fed back as past, no IO binding."""
    arch = rt.arch
    feeds = {
        f"past_key_values.{i}.{k}": np.zeros(
            (1, arch.num_key_value_heads, 0, arch.head_dim), np.float32
        )
        for i in range(arch.num_hidden_layers)
        for k in ("key", "value")
    }
    names = [o.name for o in sess.get_outputs()]
    rows = None
    if reads_fed_rows(sess):  # a fast graph of a tied quantized head
        rows = assemble.head_table_rows(
            rt._mapped, arch, assemble.DEFAULT_ACCURACY_LEVEL, rt.config
        )
    cur, total, tokens, first = np.array([ids], np.int64), len(ids), [], None
    for _ in range(steps):
        if rows is not None:
            cur, fed = rows.feeds(cur)
            feeds.update(fed)
        feeds["input_ids"] = cur
        feeds["attention_mask"] = np.ones((1, total), np.int64)
        outs = dict(zip(names, sess.run(None, feeds), strict=True))
        logits = outs["logits"][0, -1]
        first = logits if first is None else first
        tokens.append(int(logits.argmax()))
        for i in range(arch.num_hidden_layers):
            for k in ("key", "value"):
                feeds[f"past_key_values.{i}.{k}"] = outs[f"present.{i}.{k}"]
        cur, total = np.array([[tokens[-1]]], np.int64), total + 1
    return tokens, first


def _first_logits(rt: Runtime, ids: list[int]) -> np.ndarray:
    _, logits = _greedy(rt.session, rt, ids, 1)
    return logits


def test_two_budgets_pick_different_configurations(low: Runtime, high: Runtime) -> None:
    assert low.selection.entry.bits <= 4.0 < high.selection.entry.bits <= 6.0
    assert low.config != high.config
    assert low.selection.plan.total < high.selection.plan.total
    for rt in (low, high):
        t = rt.timings
        assert t.theta_s > 0 and t.graph_s > 0 and t.session_s > 0


def test_greedy_matches_plain_session_and_adapter_matters(high: Runtime) -> None:
    eos = set(high.eos_token_ids)
    want, want_logits = _greedy(_reference_session(high, True), high, PROMPT_IDS, 8)
    got = high.generate_ids(PROMPT_IDS, 8)
    # generate_ids stops at EOS; the reference runs on.
    assert got == [t for t in want[: len(got)]] and (len(got) == 8 or want[len(got)] in eos)
    mine = _first_logits(high, PROMPT_IDS)
    assert np.abs(mine - want_logits).max() < 1e-4
    _, zero_logits = _greedy(_reference_session(high, False), high, PROMPT_IDS, 1)
    assert np.abs(mine - zero_logits).max() > 100 * np.abs(mine - want_logits).max() + 1e-4


def test_exact_mode_runs_fp32_activations(tiny_llama_bundle: Path, high: Runtime) -> None:
    exact = Runtime.open(
        tiny_llama_bundle,
        budget=HIGH,
        threads=1,
        context_length=64,
        lora_bits=32,
        accuracy_level=0,
    )
    meta = exact.session.get_modelmeta().custom_metadata_map
    assert meta["coalora.accuracy_level"] == "0"
    assert exact.config == high.config
    ref = _reference_session(exact, True, lora_bits=32, accuracy_level=0)
    _, want = _greedy(ref, exact, PROMPT_IDS, 1)
    mine = _first_logits(exact, PROMPT_IDS)
    assert np.abs(mine - want).max() < 1e-4
    # the default path quantizes activations to int8: close, but not the same numbers
    fast = _first_logits(high, PROMPT_IDS)
    assert 1e-4 < np.abs(mine - fast).max() < 0.1 * np.abs(mine).max()
    exact.close()


def test_stream_equals_generate_and_greedy_is_deterministic(high: Runtime) -> None:
    pieces = list(high.stream("the news", max_new_tokens=12))
    stats = high.last_stats
    assert stats is not None and stats.prompt_tokens > 0 and stats.prefill_ms > 0
    assert "".join(pieces) == high.generate("the news", max_new_tokens=12)
    assert high.generate("the news", max_new_tokens=12) == "".join(pieces)
    raw = high.generate("the news", max_new_tokens=5, chat=False)
    assert high.last_stats.prompt_tokens < stats.prompt_tokens  # no chat wrapper
    assert isinstance(raw, str)


def test_sampling_is_seeded(high: Runtime) -> None:
    p = SamplingParams(temperature=1.0, top_p=0.9, seed=3)
    a = high.generate_ids(PROMPT_IDS, 10, p)
    assert a == high.generate_ids(PROMPT_IDS, 10, p)


def test_switch_down_and_up(tiny_llama_bundle: Path, low: Runtime) -> None:
    rt = Runtime.open(tiny_llama_bundle, budget=HIGH, threads=1, context_length=64)
    before = rt.generate_ids(PROMPT_IDS, 6)
    high_config = rt.config
    session = rt.session
    assert rt.switch(HIGH).config == high_config and rt.session is session  # no-op
    rt.switch(LOW)
    assert rt.config == low.config
    assert rt.generate_ids(PROMPT_IDS, 6) == low.generate_ids(PROMPT_IDS, 6)
    np.testing.assert_allclose(
        _first_logits(rt, PROMPT_IDS), _first_logits(low, PROMPT_IDS), atol=1e-5
    )
    rt.switch(HIGH)
    assert rt.config == high_config
    assert rt.generate_ids(PROMPT_IDS, 6) == before


def test_classify(bert: Runtime) -> None:
    out = bert.classify("the market rise and the bank vote")
    assert out.label in bert.labels == ["sport", "business", "tech"]
    assert set(out.probs) == set(bert.labels)
    assert sum(out.probs.values()) == pytest.approx(1.0, abs=1e-6)
    assert out.probs[out.label] == max(out.probs.values())
    long = " ".join(["news"] * 2000)  # truncated to the model's positions, not an error
    assert bert.classify(long).label in bert.labels


def test_input_errors(high: Runtime, bert: Runtime) -> None:
    with pytest.raises(RuntimeInputError, match="empty prompt"):
        high.generate("   ")
    with pytest.raises(RuntimeInputError, match="context holds 64"):
        high.generate("the news " * 100)
    with pytest.raises(RuntimeInputError, match="cannot classify"):
        high.classify("text")
    with pytest.raises(RuntimeInputError, match="cannot generate"):
        bert.generate("text")
    with pytest.raises(RuntimeInputError, match="empty"):
        bert.classify("")


def test_open_errors(tiny_llama_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(BudgetError):
        Runtime.open(tiny_llama_bundle, budget="3.5")
    with pytest.raises(SelectionError, match="smallest stored configuration needs"):
        Runtime.open(tiny_llama_bundle, budget="1bits")
    with pytest.raises(SelectionError, match="smallest stored configuration needs"):
        Runtime.open(tiny_llama_bundle, budget="10MB")
    with pytest.raises(ProfileError, match="known profiles"):
        Runtime.open(tiny_llama_bundle, profile="no-such-board")
    from coalora.runtime.format.reader import BundleError

    with pytest.raises(BundleError):
        Runtime.open(tmp_path / "missing")


def test_dry_open_builds_nothing(tiny_llama_bundle: Path) -> None:
    rt = Runtime.open(tiny_llama_bundle, budget=HIGH, build=False, profile="rpi4-2gb")
    assert rt.selection.plan.total <= 1718 * 10**6 and rt.profile is not None
    with pytest.raises(RuntimeError, match="build"):
        _ = rt.session


def test_session_is_built_without_copies_and_planned_in_full(high: Runtime) -> None:
    """The proto carries no weights (they are handed over in place), the computed ones
    (fused q/k/v, gate/up and the packed LoRA) sit in scratch pages that were given back,
    and the plan counts the loaded tokenizer and the fused LoRA slots."""
    from coalora.runtime.mapped import Scratch
    from coalora.runtime.plan import DEFAULT_OVERHEAD, lora_bytes, tokenizer_bytes

    built = high._built
    assert built is not None and built.proto_bytes < 200_000 and built.external_bytes > 0
    scratch = [k for k in built.keep if isinstance(k, Scratch)]
    assert len(scratch) == 1 and scratch[0].nbytes > 0
    plan = high.selection.plan
    tok = tokenizer_bytes(high.bundle)
    assert tok > 0 and plan.runtime_overhead_bytes == DEFAULT_OVERHEAD + tok
    unfused = lora_bytes(high.bundle, high.lora_bits)
    assert plan.lora_bytes == lora_bytes(high.bundle, high.lora_bits, high.config)
    assert plan.lora_bytes >= unfused


def test_scratch_pages_read_back_after_release() -> None:
    # Some CPUs' kernels keep reading the arrays they were given: a released page must come
    # back with its bytes, never as zeros.
    from coalora.runtime.mapped import Scratch

    scratch = Scratch()
    a = scratch.copy(np.arange(300_000, dtype=np.float32))
    b = scratch.copy(np.full((64, 33), 7, dtype=np.uint8))
    scratch.release()
    np.testing.assert_array_equal(a, np.arange(300_000, dtype=np.float32))
    assert int(b.sum()) == 7 * 64 * 33


def test_the_plan_counts_the_lora_slots_the_graph_builds(high: Runtime) -> None:
    """The accountant and the decoder builder share one fusion rule: for every stored
    configuration (uniform ones fuse q/k/v and gate/up, the mixed one only partly) the slots
    in the built graph are the plan's fused groups, and the plan's LoRA bytes are theirs."""
    from coalora.runtime.graphs.weights import lora_slots

    mixed = 0
    for entry in high.pareto.entries:
        proto, _ = assemble.build_graph(
            high._mapped, high.arch, entry.config, context_length=16, fuse=True, external=True
        )
        slots = lora_slots(proto)
        groups = high.accountant.fused_groups(entry.config)
        assert sorted(s.members for s in slots) == sorted(groups)
        assert sum(s.nbytes() for s in slots) == high.plan(entry.config).lora_bytes
        mixed += any(len(g) == 1 for g in groups if g[0].endswith("q_proj"))
    assert mixed  # a configuration where the rule said no


def test_build_graph_without_lora_is_the_same_graph_less_its_side_branch(high: Runtime) -> None:
    """``with_lora=False`` (what the LoRA's cost is measured against) drops exactly the side
    branch: no LoRA initializers or slots, and 3 nodes fewer per slot."""
    from coalora.runtime.graphs.weights import lora_slots

    kw = dict(context_length=16, fuse=True, external=True)
    full, _ = assemble.build_graph(high._mapped, high.arch, high.config, **kw)
    bare, arrays = assemble.build_graph(high._mapped, high.arch, high.config, with_lora=False, **kw)
    slots = lora_slots(full)
    assert slots and not lora_slots(bare)
    assert not any(name.startswith("lora.") for name in arrays)
    assert len(bare.graph.node) == len(full.graph.node) - 3 * len(slots)


def test_a_tied_head_serves_the_embedding_and_the_plan_holds_the_table_once(
    tiny_llama_bundle: Path, high: Runtime
) -> None:
    """The fast graph gathers rows from the quantized head's codes: no table in the graph,
    and the plan counts the head's codes once (prepacked) plus the rows of a full-context
    prefill instead of the fp32 table; the exact graph keeps the fp32 table (torch's)."""
    from coalora.kernels import QuantOption
    from coalora.runtime.graphs.llama import EMBED_ROWS, embedding_rows
    from coalora.runtime.plan import embedding_from_head, fed_rows_bytes, prepacked_bytes

    option = embedding_from_head(high.bundle, high.arch, high.accuracy_level)
    assert option == QuantOption.parse(high.bundle.lm_head)
    proto, _ = assemble.build_graph(
        high._mapped, high.arch, high.config, context_length=16, fuse=True, external=True
    )
    ops = {n.op_type for n in proto.graph.node}
    assert "GatherBlockQuantized" in ops
    assert "model.embed_tokens.weight" not in {t.name for t in proto.graph.initializer}
    # the rows a run is fed are the head's own rows, read from the file
    rows = high._decoder.rows
    head = assemble.lm_head(high._mapped, high.arch)
    views = embedding_rows(head, high.arch.vocab_size, high.arch.hidden_size)
    ids = np.array([[5, 3, 5, high.arch.vocab_size - 1]])
    index, fed = rows.feeds(ids)
    assert index.tolist() == [[1, 0, 1, 2]]
    for name, view in zip(EMBED_ROWS, views, strict=True):
        np.testing.assert_array_equal(fed[name], view[[3, 5, high.arch.vocab_size - 1]])
    with pytest.raises(IndexError, match="token ids"):
        rows.feeds(np.array([[high.arch.vocab_size]]))
    exact = Runtime.open(
        tiny_llama_bundle,
        budget=HIGH,
        threads=1,
        context_length=high.context_length,
        build=False,
        lora_bits=32,
        accuracy_level=0,
    )
    assert embedding_from_head(exact.bundle, exact.arch, 0) is None
    v, h = high.arch.vocab_size, high.arch.hidden_size
    fast_other = high.accountant.plan(high.config).other_weights_bytes
    exact_other = exact.accountant.plan(high.config).other_weights_bytes
    # the exact graph also holds its dequantized head (3 x fp32): take that out first
    exact_base = exact_other - 3 * 4 * v * h
    rows = fed_rows_bytes(high.arch, option, high.context_length)
    prepack = prepacked_bytes(option, v, h) - option.nbytes(v, h)  # the fast head's copy
    assert exact_base - fast_other == 4 * v * h - rows - prepack
    assert rows == min(v, high.context_length) * option.nbytes(1, h) < option.nbytes(v, h)
