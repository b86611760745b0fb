"""The stored Pareto set, memory plans, and selecting a configuration for a budget."""

from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from collections.abc import Callable

import pytest

from coalora.kernels import ConfigSpace, Configuration, MatrixSpec, QuantOption
from coalora.runtime import selection as select_module
from coalora.runtime.budget import parse_budget
from coalora.runtime.format.pareto import ParetoEntry, ParetoError, ParetoSet
from coalora.runtime.plan import (
    DEFAULT_OVERHEAD,
    PREPACKED_FACTOR,
    MemoryPlan,
    kv_cache_bytes_per_token,
    plan_memory,
)
from coalora.runtime.selection import SelectionError, select

MB = 10**6
OTHER = 50 * MB
LORA = 2 * MB
KV_PER_TOKEN = 20_000  # bytes


@pytest.fixture(scope="module")
def space() -> ConfigSpace:
    return ConfigSpace(
        [
            MatrixSpec("l0.q_proj", 2048, 2048),
            MatrixSpec("l0.v_proj", 2048, 2048),
            MatrixSpec("l0.mlp", 8192, 2048),
        ]
    )


def _entry(
    space: ConfigSpace, options: dict[str, str], metric: float, seen: bool = True
) -> ParetoEntry:
    config = space.validate(options)
    return ParetoEntry(config, space.bits(config), space.nbytes(config), metric, seen)


def _uniform(space: ConfigSpace, option: str, metric: float, seen: bool = True) -> ParetoEntry:
    return _entry(space, {m.name: option for m in space.matrices}, metric, seen)


@pytest.fixture(scope="module")
def pareto(space: ConfigSpace) -> ParetoSet:
    mixed = {"l0.q_proj": "8b32", "l0.v_proj": "8b32", "l0.mlp": "4b64"}
    return ParetoSet(
        (
            _uniform(space, "2b128", 0.50),
            _uniform(space, "4b64", 0.80),
            _entry(space, mixed, 0.86, seen=False),
            _uniform(space, "8b32", 0.90),
        ),
        metric_name="accuracy",
    )


def _plan_fn(space: ConfigSpace, context_length: int) -> Callable[[Configuration], MemoryPlan]:
    def plan(config: Configuration) -> MemoryPlan:
        return plan_memory(
            space,
            config,
            other_weights_bytes=OTHER,
            lora_bytes=LORA,
            kv_bytes_per_token=KV_PER_TOKEN,
            context_length=context_length,
        )

    return plan


# -- plans --------------------------------------------------------------------------------------
def test_plan_counts_every_part(space: ConfigSpace) -> None:
    config = space.uniform(QuantOption(4, 64))
    plan = _plan_fn(space, 1024)(config)
    # the matrices as MatMulNBits holds them once prepacked: more than their stored bytes
    resident = sum(
        math.ceil(PREPACKED_FACTOR[4] * QuantOption(4, 64).nbytes(m.out_features, m.in_features))
        for m in space.matrices
    )
    assert plan.quantized_weights_bytes == resident > space.nbytes(config)
    assert plan.kv_cache_bytes == 1024 * KV_PER_TOKEN
    assert plan.runtime_overhead_bytes == DEFAULT_OVERHEAD
    assert plan.total == resident + OTHER + LORA + 1024 * KV_PER_TOKEN + DEFAULT_OVERHEAD
    assert plan.to_dict()["total"] == plan.total
    with pytest.raises(ValueError, match="context_length"):
        plan_memory(
            space,
            config,
            other_weights_bytes=0,
            lora_bytes=0,
            kv_bytes_per_token=1,
            context_length=-1,
        )


def test_kv_bytes_per_token() -> None:
    # SmolLM2-135M: 30 layers, 3 KV heads of 64, fp32 keys and values.
    assert kv_cache_bytes_per_token(30, 3, 64) == 2 * 30 * 3 * 64 * 4
    with pytest.raises(ValueError):
        kv_cache_bytes_per_token(0, 3, 64)


# -- bits budgets -------------------------------------------------------------------------------
def test_bits_budget_picks_best_metric_under_budget(space: ConfigSpace, pareto: ParetoSet) -> None:
    bits = sorted(e.bits for e in pareto.entries)
    plan_fn = _plan_fn(space, 512)
    got = select(pareto, parse_budget(f"{bits[2] + 0.01:.3f}bits"), plan_fn)
    assert got.entry.metric == 0.86
    assert got.entry.bits <= bits[2] + 0.01
    assert got.plan == plan_fn(got.entry.config)
    assert got.entry.config == got.config
    got = select(pareto, parse_budget(f"{bits[1] + 0.01:.3f}bits"), plan_fn)
    assert got.entry.metric == 0.80
    got = select(pareto, parse_budget("32bits"), plan_fn)
    assert got.entry.metric == 0.90
    assert "\n" not in got.reason and "accuracy 0.9" in got.reason


def test_bits_budget_exactly_at_an_entry_fits(space: ConfigSpace, pareto: ParetoSet) -> None:
    entry = pareto.entries[1]
    got = select(pareto, parse_budget(f"{entry.bits!r}bits"), _plan_fn(space, 16))
    assert got.entry == entry


def test_ties_go_to_fewer_bytes(space: ConfigSpace) -> None:
    cheap = _uniform(space, "4b128", 0.8)
    dear = _uniform(space, "4b32", 0.8)
    tied = ParetoSet((dear, cheap), "accuracy")
    got = select(tied, parse_budget("8bits"), _plan_fn(space, 16))
    assert got.entry == cheap


def test_lower_is_better_metric(space: ConfigSpace) -> None:
    ppl = ParetoSet(
        (_uniform(space, "2b128", 30.0), _uniform(space, "4b64", 12.0)),
        "perplexity",
        higher_is_better=False,
    )
    assert select(ppl, parse_budget("8bits"), _plan_fn(space, 16)).entry.metric == 12.0


def test_bits_error_names_the_smallest_budget_that_fits(
    space: ConfigSpace, pareto: ParetoSet
) -> None:
    smallest = min(e.bits for e in pareto.entries)
    with pytest.raises(SelectionError) as info:
        select(pareto, parse_budget("2bits"), _plan_fn(space, 16))
    message = str(info.value)
    m = re.search(r"smallest stored configuration needs (\d+\.\d\d) bits", message)
    assert m, message
    assert float(m.group(1)) >= smallest
    assert float(m.group(1)) - smallest < 0.01
    # The named budget really is enough.
    got = select(pareto, parse_budget(f"{m.group(1)}bits"), _plan_fn(space, 16))
    assert got.entry.bits == smallest


def test_bits_budget_still_respects_available_memory(space: ConfigSpace, pareto: ParetoSet) -> None:
    plan_fn = _plan_fn(space, 16)
    totals = sorted(plan_fn(e.config).total for e in pareto.entries)
    got = select(pareto, parse_budget("32bits"), plan_fn, available_bytes=totals[1])
    assert plan_fn(got.entry.config).total <= totals[1]
    assert got.entry.metric == 0.80
    assert got.limit_bytes == totals[1]


# -- byte budgets -------------------------------------------------------------------------------
def test_byte_budget_uses_the_whole_plan(space: ConfigSpace, pareto: ParetoSet) -> None:
    best = max(pareto.entries, key=lambda e: e.metric)
    short = _plan_fn(space, 128)
    fits_short = short(best.config).total
    budget = parse_budget(f"{fits_short}B")
    assert select(pareto, budget, short).entry == best
    # Same budget, longer context: the KV cache no longer leaves room for the best entry.
    long = _plan_fn(space, 128 + 512)
    got = select(pareto, budget, long)
    assert got.entry != best
    assert got.plan.total <= fits_short
    assert got.plan.kv_cache_bytes == (128 + 512) * KV_PER_TOKEN


def test_byte_error_names_the_smallest_budget_in_its_unit(
    space: ConfigSpace, pareto: ParetoSet
) -> None:
    plan_fn = _plan_fn(space, 256)
    need = min(plan_fn(e.config).total for e in pareto.entries)
    with pytest.raises(SelectionError) as info:
        select(pareto, parse_budget("100MB"), plan_fn)
    m = re.search(r"needs (\d+(?:\.\d)?) MB", str(info.value))
    assert m, str(info.value)
    assert need <= float(m.group(1)) * MB < need + 0.1 * MB
    select(pareto, parse_budget(f"{m.group(1)}MB"), plan_fn)  # the named budget fits

    with pytest.raises(SelectionError, match=r"needs \d+(\.\d)? MiB"):
        select(pareto, parse_budget("100MiB"), plan_fn)
    with pytest.raises(SelectionError) as info:
        select(pareto, parse_budget("0.1GB"), plan_fn)
    m = re.search(r"needs (0\.\d+) GB", str(info.value))
    assert m, str(info.value)
    select(pareto, parse_budget(f"{m.group(1)}GB"), plan_fn)


def test_available_bytes_clamps_a_byte_budget(space: ConfigSpace, pareto: ParetoSet) -> None:
    plan_fn = _plan_fn(space, 16)
    totals = sorted(plan_fn(e.config).total for e in pareto.entries)
    got = select(pareto, parse_budget("10GB"), plan_fn, available_bytes=totals[0])
    assert got.plan.total == totals[0]
    assert "clamped" in got.reason


def test_auto_uses_available_bytes(space: ConfigSpace, pareto: ParetoSet) -> None:
    plan_fn = _plan_fn(space, 16)
    totals = sorted(plan_fn(e.config).total for e in pareto.entries)
    got = select(pareto, parse_budget("auto"), plan_fn, available_bytes=totals[2])
    assert got.entry.metric == 0.86
    with pytest.raises(SelectionError, match="auto budget"):
        select(pareto, parse_budget("auto"), plan_fn, available_bytes=totals[0] - 1)


def test_auto_probes_when_not_told(
    space: ConfigSpace, pareto: ParetoSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan_fn = _plan_fn(space, 16)
    small = min(plan_fn(e.config).total for e in pareto.entries)

    class FakeProbe:
        plan_limit_bytes = small
        rlimit_bytes = None

    monkeypatch.setattr(select_module, "available_memory", lambda: FakeProbe())
    assert select(pareto, parse_budget("auto"), plan_fn).plan.total == small


# -- the Pareto front and its JSON --------------------------------------------------------------
def test_front_drops_dominated_entries(space: ConfigSpace) -> None:
    a = _uniform(space, "2b128", 0.5)
    b = _uniform(space, "4b64", 0.8)
    worse_b = _uniform(space, "4b32", 0.7)  # more bits than b and a lower metric
    c = _uniform(space, "8b32", 0.9)
    worse_c = _uniform(space, "8b64", 0.9)  # fewer bits than c, same metric: c is dominated
    front = ParetoSet((c, worse_b, a, worse_c, b), "accuracy").front()
    assert front.entries == (a, b, worse_c)
    assert front.metric_name == "accuracy"

    ppl = ParetoSet((a, b), "perplexity", higher_is_better=False).front()
    assert ppl.entries == (a,)  # fewer bits and lower perplexity dominates


def test_json_round_trip(space: ConfigSpace, pareto: ParetoSet) -> None:
    text = json.dumps(pareto.to_dict())
    back = ParetoSet.from_dict(json.loads(text), space)
    assert back == pareto
    assert [e.seen_in_training for e in back.entries] == [True, True, False, True]


def _stored(pareto: ParetoSet) -> dict:
    return json.loads(json.dumps(pareto.to_dict()))


@pytest.mark.parametrize(
    ("tamper", "says"),
    [
        (lambda d: d["entries"][0].update(bits=d["entries"][0]["bits"] - 0.5), "stored bits"),
        (lambda d: d["entries"][0].update(nbytes=d["entries"][0]["nbytes"] + 1), "stored nbytes"),
        (lambda d: d["entries"][1]["options"].update({"l9.q": "4b32"}), "unknown matrix"),
        (lambda d: d["entries"][1]["options"].update({"l0.mlp": "3b32"}), "l0.mlp"),
        (lambda d: d["entries"][0].update(metric=float("nan")), "finite"),
        (lambda d: d["entries"][0].pop("seen_in_training"), "seen_in_training"),
        (lambda d: d["entries"][0].update(seen_in_training="yes"), "true or false"),
        (lambda d: d["entries"].append(dict(d["entries"][0])), "stored twice"),
        (lambda d: d.update(entries=[]), "non-empty"),
        (lambda d: d.update(format_version=99), "format version"),
        (lambda d: d.pop("higher_is_better"), "higher_is_better"),
    ],
)
def test_from_dict_refuses_bad_sets(
    space: ConfigSpace, pareto: ParetoSet, tamper: Callable[[dict], object], says: str
) -> None:
    data = _stored(pareto)
    tamper(data)
    with pytest.raises(ParetoError, match=says):
        ParetoSet.from_dict(data, space)


# -- the device install -------------------------------------------------------------------------
def test_these_modules_do_not_import_torch_or_transformers() -> None:
    code = (
        "import sys\n"
        "import coalora.runtime.budget, coalora.runtime.probe, coalora.runtime.profiles\n"
        "import coalora.runtime.plan, coalora.runtime.selection\n"
        "bad = sorted(m for m in sys.modules\n"
        "             if m.split('.')[0] in ('torch', 'transformers', 'onnx'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"
