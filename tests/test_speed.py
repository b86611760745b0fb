"""The compute budget: decode work counted from the graph the builder makes, device costs
measured and cached, and ``--min-speed`` choosing by predicted speed."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from coalora.kernels.options import QuantOption
from coalora.runtime import assemble, speed
from coalora.runtime.engine import Runtime, RuntimeInputError
from coalora.runtime.selection import SelectionError
from coalora.runtime.speed import DecodeWork, DeviceSpeed, decode_work

RUN = [sys.executable, "-m", "coalora.runtime.cli"]


@pytest.fixture(autouse=True)
def _own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def rt(tiny_llama_bundle: Path) -> Runtime:
    return Runtime.open(
        tiny_llama_bundle, budget="8bits", threads=1, context_length=64, build=False
    )


def _costs(per_bit: float = 1e-10, fp32: float = 4e-10, node: float = 1e-7) -> DeviceSpeed:
    """Costs in proportion to the bits read, as on a bandwidth-bound device."""
    names = ["2b64", "4b32", "8b32", "8b16"]
    return DeviceSpeed(
        {n: per_bit * QuantOption.parse(n).bits for n in names}, fp32, node, "test costs"
    )


@pytest.mark.parametrize(
    ("head", "exact"), [("quantized", False), ("fp32", False), ("quantized", True)]
)
def test_decode_work_counts_the_nodes_and_weights_the_builder_makes(
    tiny_llama_bundle: Path, rt: Runtime, head: str, exact: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """For every stored configuration (uniform ones fuse q/k/v and gate/up, a mixed one only
    partly), the predicted node count is the built graph's and the MatMulNBits weights are
    its initializers' (the quantized matrices, the 8-bit LoRA branch, a quantized head); the
    exact graph's dequantized matrices and fp32 LoRA are fp32 values read."""
    from coalora.runtime.format.reader import Bundle

    assert rt.bundle.lm_head  # the tiny bundle stores a quantized head
    if head == "fp32":
        # an fp32 head reads an fp32 table, which a bundle with a quantized tied head does not
        # ship (spec.EMBED_TOKENS): give it the head's codes dequantized
        from coalora.kernels.matmulnbits import dequantize
        from coalora.runtime.format.spec import EMBED_TOKENS

        table = dequantize(assemble.lm_head(rt._mapped, rt.arch))
        plain_base = assemble.MappedBundle.base
        monkeypatch.setattr(
            assemble.MappedBundle, "base", lambda self: {**plain_base(self), EMBED_TOKENS: table}
        )
        monkeypatch.setattr(Bundle, "lm_head", property(lambda self: None))
    graph = {"lora_bits": 32, "accuracy_level": 0} if exact else {}
    if exact:
        rt = Runtime.open(
            tiny_llama_bundle, budget="8bits", threads=1, context_length=64, build=False, **graph
        )
    for entry in rt.pareto.entries:
        proto, arrays = assemble.build_graph(
            rt._mapped,
            rt.arch,
            entry.config,
            context_length=16,
            fuse=True,
            external=True,
            last_logits=True,
            **graph,
        )
        work = decode_work(rt.accountant, rt.arch, entry.config, position=0)
        assert work.nodes == len(proto.graph.node)
        weights = {}
        for node in proto.graph.node:
            if node.op_type == "MatMulNBits":
                a = {x.name: x.i for x in node.attribute}
                opt = QuantOption(a["bits"], a["block_size"])
                weights[opt] = weights.get(opt, 0) + a["K"] * a["N"]
        assert weights == dict(work.weights)
        fp32 = sum(
            int(np.prod(t.dims))
            for t in proto.graph.initializer
            if t.name.endswith(".dequantized") or (exact and t.name.startswith("lora."))
        )
        if head == "fp32":
            fp32 += rt.arch.vocab_size * rt.arch.hidden_size
        assert work.fp32_values == fp32  # nothing in the KV cache at position 0
        assert exact == (fp32 > 0 and "8b32" not in {o.name for o in work.weights})


def test_the_kv_cache_read_grows_with_the_position(rt: Runtime) -> None:
    config = rt.pareto.entries[0].config
    w0 = decode_work(rt.accountant, rt.arch, config, position=0)
    w10 = decode_work(rt.accountant, rt.arch, config, position=10)
    assert w10.fp32_values - w0.fp32_values == 10 * rt.accountant.kv_bytes_per_token // 4


def test_a_prediction_adds_what_a_step_reads_and_runs() -> None:
    work = DecodeWork({QuantOption(4, 32): 1000}, fp32_values=100, nodes=10)
    s = DeviceSpeed({"4b32": 1e-9}, 2e-9, 1e-6, "test costs")
    assert s.seconds(work) == pytest.approx(1000e-9 + 200e-9 + 10e-6)
    # a board known by its bandwidth: bytes over bandwidth
    board = DeviceSpeed.from_bandwidth(1.0, "board")
    per_weight = QuantOption(4, 32).nbytes(1, 32) / 32
    assert board.weight_seconds(QuantOption(4, 32)) == pytest.approx(per_weight / 1e9)


def test_the_benchmarks_predict_calibrate_and_score_as_the_runtime_does(
    rt: Runtime, tiny_llama_bundle: Path
) -> None:
    from benchmarks import speed_prediction

    cheapest = min(rt.pareto.entries, key=lambda e: e.bits)
    cheap = Runtime.open(
        tiny_llama_bundle,
        budget=f"{cheapest.bits + 1e-9:.9f}bits",
        threads=1,
        context_length=64,
        build=False,
    )
    costs, rows = speed_prediction.predict({"cheap": cheap, "dear": rt}, position=20)
    for key, r in (("cheap", cheap), ("dear", rt)):
        work = decode_work(r.accountant, r.arch, r.config, 20)
        assert rows[key]["predicted_tok_s"] == pytest.approx(costs.tok_s(work))
        assert rows[key]["nodes"] == work.nodes
    # one decode of "dear" at twice its prediction scales every prediction by 2
    p = rows["dear"]["predicted_tok_s"]
    assert speed_prediction.calibrate(rows, "dear", 2 * p) == pytest.approx(2.0)
    assert rows["cheap"]["calibrated_tok_s"] == pytest.approx(2 * rows["cheap"]["predicted_tok_s"])
    speed_prediction.score(rows["dear"], 3 * p)  # measured 3p: calibrated 2p, raw p
    assert rows["dear"]["error"] == pytest.approx(1 / 3)
    assert rows["dear"]["uncalibrated_error"] == pytest.approx(2 / 3)


def test_measured_costs_are_cached_and_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    opts = {QuantOption(4, 32), QuantOption(8, 32)}
    first = speed.device_speed(opts, threads=1)
    assert set(first.seconds_per_weight) == {"4b32", "8b32"}
    for v in [*first.seconds_per_weight.values(), first.fp32_seconds_per_value, first.node_seconds]:
        assert 0 < v < 1e-3 and math.isfinite(v)

    def no_measuring(*a: object, **k: object) -> DeviceSpeed:
        raise AssertionError("measured again although cached")

    monkeypatch.setattr(speed, "measure", no_measuring)
    again = speed.device_speed({QuantOption(4, 32)}, threads=1)
    assert again.seconds_per_weight == first.seconds_per_weight


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        "[]",
        '{"version": 1, "machines": []}',
        '{"version": 1, "machines": {"KEY": {"seconds_per_weight": {"4b32": NaN},'
        ' "fp32_seconds_per_value": 1e-9, "node_seconds": 1e-6}}}',
        '{"version": 1, "machines": {"KEY": {"seconds_per_weight": {"4b32": -1},'
        ' "fp32_seconds_per_value": 1e-9, "node_seconds": 1e-6}}}',
        '{"version": 1, "machines": {"KEY": {"seconds_per_weight": {"4b32": 1e-10}}}}',
        "[" * 100_000,
        " " * (2**20 + 1),
    ],
)
def test_a_damaged_cache_is_measured_again(content: str, monkeypatch: pytest.MonkeyPatch) -> None:
    key = speed._machine_key(1, 4)
    path = speed.cache_path()
    path.parent.mkdir(parents=True)
    path.write_text(content.replace("KEY", key.replace('"', "")), encoding="utf-8")
    measured = _costs()
    monkeypatch.setattr(speed, "measure", lambda *a, **k: measured)
    assert speed.device_speed({QuantOption(4, 32)}, threads=1) is measured
    assert key in json.loads(path.read_text())["machines"]


def _write_cache(rt: Runtime, costs: DeviceSpeed) -> None:
    path = speed.cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    key = speed._machine_key(rt.threads, rt.accuracy_level)
    path.write_text(json.dumps({"version": 1, "machines": {key: costs.to_json()}}))


def test_a_cache_measured_for_other_options_does_not_break_a_decode(
    tiny_llama_bundle: Path,
) -> None:
    """The machine's cache holds the options of the bundle that measured it; a decode of a
    bundle reading another option is served and leaves the cache uncalibrated."""
    opened = Runtime.open(tiny_llama_bundle, budget="8bits", threads=1, build=False)
    costs = _costs()
    work = decode_work(opened.accountant, opened.arch, opened.config, 8)
    missing = sorted({o.name for o in work.weights} & set(costs.seconds_per_weight))[0]
    partial = replace(
        costs,
        seconds_per_weight={n: v for n, v in costs.seconds_per_weight.items() if n != missing},
    )
    _write_cache(opened, partial)
    served = Runtime.open(tiny_llama_bundle, budget="8bits", threads=1, context_length=64)
    out = served.generate_ids([2, 5, 7], speed.CALIBRATION_TOKENS, None)
    assert len(out) >= 1
    assert speed.cached_speed(1).calibration == 1.0


def test_min_speed_picks_the_best_configuration_fast_enough(tiny_llama_bundle: Path) -> None:
    opened = Runtime.open(tiny_llama_bundle, budget="8bits", threads=1, build=False)
    _write_cache(opened, _costs())
    by_bits = sorted(opened.pareto.entries, key=lambda e: e.bits)
    speeds = [opened.predicted_tok_s(e.config) for e in by_bits]
    assert speeds == sorted(speeds, reverse=True)  # fewer bits read, faster
    # between the two slowest: the best-metric entry must be the next one down
    limit = (speeds[-1] + speeds[-2]) / 2
    rt = Runtime.open(tiny_llama_bundle, budget="8bits", threads=1, build=False, min_speed=limit)
    assert rt.selection.predicted_tok_s is not None and rt.selection.predicted_tok_s >= limit
    assert rt.config != by_bits[-1].config
    assert "predicted >=" in rt.selection.reason
    with pytest.raises(SelectionError, match=r"needs at least .* tok/s; the fastest stored"):
        Runtime.open(
            tiny_llama_bundle, budget="8bits", threads=1, build=False, min_speed=speeds[0] * 2
        )


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_min_speed_must_be_a_positive_number(tiny_llama_bundle: Path, bad: float) -> None:
    with pytest.raises(RuntimeInputError, match="min-speed"):
        Runtime.open(tiny_llama_bundle, budget="8bits", build=False, min_speed=bad)


def test_min_speed_is_for_decoders(tiny_bert_bundle: Path) -> None:
    with pytest.raises(RuntimeInputError, match="causal-lm"):
        Runtime.open(tiny_bert_bundle, budget="10bits", build=False, min_speed=10)


def test_the_cli_shows_predictions_and_refuses_what_is_too_slow(
    tiny_llama_bundle: Path, _own_cache: Path
) -> None:
    opened = Runtime.open(tiny_llama_bundle, budget="8bits", threads=1, build=False)
    _write_cache(opened, _costs())
    env = {**os.environ, "XDG_CACHE_HOME": str(_own_cache)}
    base = [*RUN, str(tiny_llama_bundle), "--threads", "1", "--dry-run"]
    out = subprocess.run([*base, "--json"], capture_output=True, text=True, env=env, check=True)
    rows = json.loads(out.stdout)["configurations"]
    assert len(rows) == len(opened.pareto.entries) and sum(r["chosen"] for r in rows) == 1
    fastest = max(r["predicted_tok_s"] for r in rows)
    assert fastest == pytest.approx(
        max(opened.predicted_tok_s(e.config) for e in opened.pareto.entries)
    )
    slow = subprocess.run(
        [*base, "--min-speed", str(fastest * 3)], capture_output=True, text=True, env=env
    )
    assert slow.returncode == 2
    lines = slow.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    assert f"needs at least {fastest * 3:g} tok/s" in lines[0]
    assert "the fastest stored configuration is predicted at" in lines[0]
    shown = subprocess.run([*base], capture_output=True, text=True, env=env, check=True)
    assert "predicted tok/s" in shown.stderr and "chosen" in shown.stderr


def test_the_first_long_decode_calibrates_the_cached_costs(
    tiny_llama_bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real decode long enough scales later predictions by measured / predicted, once."""
    opened = Runtime.open(tiny_llama_bundle, budget="8bits", threads=1, build=False)
    _write_cache(opened, _costs())
    before = opened.predicted_tok_s(opened.config)
    speed.record_decode(opened.threads, opened.accuracy_level, before, before / 4)
    cal = speed.cached_speed(opened.threads, opened.accuracy_level)
    assert cal is not None and cal.calibration == pytest.approx(0.25)
    assert "calibrated" in cal.source
    again = Runtime.open(tiny_llama_bundle, budget="8bits", threads=1, build=False)
    assert again.predicted_tok_s(again.config) == pytest.approx(before / 4)
    speed.record_decode(opened.threads, opened.accuracy_level, before, before * 10)
    assert speed.cached_speed(1).calibration == pytest.approx(0.25)  # once only
    # and the engine does it after a generation of CALIBRATION_TOKENS or more
    _write_cache(opened, _costs())
    served = Runtime.open(tiny_llama_bundle, budget="8bits", threads=1, context_length=64)
    served.generate_ids([2, 5, 7], speed.CALIBRATION_TOKENS, None)
    stats = served.last_stats
    assert stats is not None and stats.new_tokens >= speed.CALIBRATION_TOKENS
    assert speed.cached_speed(1).calibration != 1.0
