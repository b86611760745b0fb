"""Every committed benchmark report is what its committed JSON renders to, byte for byte
(what ``python -m benchmarks.<name> --report-only`` rewrites). No benchmark runs here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from benchmarks.common import RESULTS


def _json(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text(encoding="utf-8"))


def _same(written: Path, name: str) -> None:
    assert written.read_bytes() == (RESULTS / f"{name}.md").read_bytes(), name


@pytest.mark.parametrize("name", ["quantizer_error", "allocation"])
def test_error_and_allocation_reports(name: str, tmp_path: Path) -> None:
    import importlib

    module = importlib.import_module(f"benchmarks.{name}")
    out = tmp_path / f"{name}.md"
    module.write_md(_json(name), out=out)
    _same(out, name)


def test_runtime_speed_report(tmp_path: Path) -> None:
    from benchmarks.runtime_speed_report import report

    out = tmp_path / "runtime_speed.md"
    out.write_text(report(_json("runtime_speed")), encoding="utf-8")
    _same(out, "runtime_speed")


def test_parity_report(tmp_path: Path) -> None:
    from benchmarks.parity_report import write_report

    res = _json("parity")
    out = tmp_path / "parity.md"
    write_report(res, res["command"], res["wall_s"], out)
    _same(out, "parity")


@pytest.mark.parametrize("model", ["minilm", "smollm2", "gemma3"])
def test_baselines_report(model: str, tmp_path: Path) -> None:
    from benchmarks.baselines import targets, train_passes, write_report

    name = f"baselines_{model}"
    res = _json(name)
    res.setdefault("train_passes", train_passes(res))
    res["targets"] = targets(res)
    shutil.copy(RESULTS / f"{name}.json", tmp_path / f"{name}.json")
    command = res.get("command", f"python -m benchmarks.baselines --model {model}")
    write_report(res, command, tmp_path / name)
    _same(tmp_path / f"{name}.md", name)


# The module whose ``summary`` function computes each committed result's summary.
SUMMARIES = {
    "quantizer_error": "quantizer_error",
    "allocation": "allocation",
    "baselines_minilm": "baselines",
    "baselines_smollm2": "baselines",
    "baselines_gemma3": "baselines",
    "parity": "parity",
    "parity_gemma3": "parity",
    "runtime_speed_gemma3": "runtime_speed_gemma3",
    "runtime_speed": "runtime_speed",
    "scaling": "scaling",
    "quantizer_quality": "quantizer_quality",
    "serving_memory": "serving_memory",
    "prepacked_memory": "prepacked_memory",
    "zero_points": "zero_points",
    "head_bits": "head_bits",
    "configured_head": "configured_head",
    "seed_spread_smollm2": "seed_spread",
    "seed_spread_smollm2_low_bit_rank16": "seed_spread",
    "lora_cost": "lora_cost",
}


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.json")), ids=lambda p: p.stem)
def test_every_result_has_a_summary(path: Path) -> None:
    """Every committed result leads with a ``summary`` object; where a benchmark computes it
    with a ``summary`` function, it is that function of the committed figures (not typed in)."""
    import importlib

    res = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(res.get("summary"), dict) and res["summary"], path.name
    assert next(iter(res)) == "summary"
    if path.stem in SUMMARIES:
        module = importlib.import_module(f"benchmarks.{SUMMARIES[path.stem]}")
        assert res["summary"] == json.loads(json.dumps(module.summary(res)))


def test_scaling_report() -> None:
    if not (RESULTS / "scaling.json").is_file():
        pytest.skip("no committed scaling result")
    from benchmarks.scaling import render

    assert render(_json("scaling")) == (RESULTS / "scaling.md").read_text(encoding="utf-8")


def test_serving_memory_report() -> None:
    from benchmarks.serving_memory import render

    assert render(_json("serving_memory")) == (RESULTS / "serving_memory.md").read_text(
        encoding="utf-8"
    )


def test_zero_points_report() -> None:
    from benchmarks.zero_points import report

    assert report(_json("zero_points")) == (RESULTS / "zero_points.md").read_text(encoding="utf-8")


def test_head_bits_report_and_its_measures() -> None:
    from benchmarks.head_bits import agreeing_prefix, repeated_4grams, report

    assert report(_json("head_bits")) == (RESULTS / "head_bits.md").read_text(encoding="utf-8")
    assert repeated_4grams([1, 2, 3, 4, 5, 6]) == 0.0
    assert repeated_4grams([1, 2, 3, 4] * 3) == pytest.approx(1 - 4 / 9)  # 9 grams, 4 distinct
    assert repeated_4grams([1, 2]) == 0.0
    assert agreeing_prefix([1, 2, 3, 9], [1, 2, 3, 4]) == 3
    assert agreeing_prefix([5], [1, 2]) == 0


@pytest.mark.parametrize("stem", sorted(p.stem for p in RESULTS.glob("seed_spread_*.json")))
def test_seed_spread_report(stem: str) -> None:
    from benchmarks.seed_spread import report

    assert report(_json(stem)) == (RESULTS / f"{stem}.md").read_text(encoding="utf-8")


def test_seed_spread_adds_shared_lora_to_committed_seeds(tmp_path: Path, monkeypatch) -> None:
    """``--add --shared`` trains Shared-LoRA alone for a committed seed, on the same allocation,
    takes seed 0's from the full run, and refuses a seed that has nothing left to add."""
    import benchmarks.common as common
    import benchmarks.seed_spread as ss

    keys = ("shared_lora", "shared_train_s", "shared_from")
    earlier = _json("seed_spread_smollm2")
    earlier["rows"] = [{k: v for k, v in r.items() if k not in keys} for r in earlier["rows"]]
    (tmp_path / "seed_spread_smollm2.json").write_text(json.dumps(earlier), encoding="utf-8")
    shutil.copy(RESULTS / "baselines_smollm2.json", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(ss, "RESULTS", tmp_path)
    bits = {r["seed"]: r["bits"] for r in earlier["rows"]}
    calls: list[tuple[tuple[str, ...], int]] = []

    def fake_run(model, quick, threads, methods, levers, budgets, seed):  # noqa: ANN001
        calls.append((tuple(methods), seed))
        return {
            "budgets": list(budgets),
            "bits": [bits.get(seed, 2.5) + fake_run.shift],
            "curves": {m: [(budgets[0], 40.0 + i)] for i, m in enumerate(methods)},
            "train_seconds": {m: 10.0 for m in methods},
        }

    fake_run.shift = 0.0
    monkeypatch.setattr(ss, "run_baselines", fake_run)

    assert ss.main(["--seeds", "2", "--add"]) == 2  # already there, nothing to add
    fake_run.shift = 0.01  # another allocation: not the committed row's
    assert ss.main(["--seeds", "2", "--add", "--shared"]) == 2
    assert json.loads((tmp_path / "seed_spread_smollm2.json").read_text()) == earlier
    fake_run.shift = 0.0
    assert ss.main(["--seeds", "2", "--add", "--shared"]) == 0
    assert calls[-1] == (("shared-lora",), 2)
    res = json.loads((tmp_path / "seed_spread_smollm2.json").read_text())
    rows = {r["seed"]: r for r in res["rows"]}
    full = _json("baselines_smollm2")
    assert rows[0]["shared_lora"] == full["curves"]["shared-lora"][0][1]
    assert rows[2]["shared_lora"] == 40.0 and rows[2]["coa_lora"] == earlier["rows"][2]["coa_lora"]
    assert "shared_lora" not in rows[1]
    assert set(res["summary"]["coa_over_shared"]) == {"0", "2"}
    assert ss.main(["--seeds", "2", "--add", "--shared"]) == 2  # nothing left to add
    assert ss.main(["--seeds", "5", "--add", "--shared"]) == 0  # a new seed trains all three
    assert calls[-1] == (("coa-lora", "per-config-lora", "shared-lora"), 5)


def test_seed_spread_on_minilm_reads_accuracy_points(tmp_path: Path, monkeypatch) -> None:
    """MiniLM's seeds run at 6 bits and compare in accuracy points (its target is at most 0.5
    below the per-configuration LoRA), seed 0 coming from the committed full run."""
    import benchmarks.common as common
    import benchmarks.seed_spread as ss

    shutil.copy(RESULTS / "baselines_minilm.json", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(ss, "RESULTS", tmp_path)
    calls: list[tuple[str, tuple[float, ...], int]] = []

    def fake_run(model, quick, threads, methods, levers, budgets, seed):  # noqa: ANN001
        calls.append((model, tuple(budgets), seed))
        acc = {"coa-lora": 0.96875, "per-config-lora": 0.975}  # 310 and 312 of 320
        return {
            "budgets": list(budgets),
            "bits": [6.0],
            "curves": {m: [(budgets[0], acc[m])] for m in methods},
            "train_seconds": {m: 10.0 for m in methods},
        }

    monkeypatch.setattr(ss, "run_baselines", fake_run)
    assert ss.main(["--model", "minilm", "--seeds", "0", "--with-full-run"]) == 2  # seed 0 twice
    assert not (tmp_path / "seed_spread_minilm.json").exists()
    assert ss.main(["--model", "minilm", "--seeds", "1", "--with-full-run"]) == 0
    assert calls == [("minilm", (6.0,), 1)]
    res = json.loads((tmp_path / "seed_spread_minilm.json").read_text())
    s = res["summary"]
    full = _json("baselines_minilm")["summary"]["metric"]
    i = _json("baselines_minilm")["budgets"].index(6.0)
    assert s["coa_minus_per_config_points"]["0"] == pytest.approx(
        100 * (full["coa-lora"][i] - full["per-config-lora"][i])
    )
    assert s["coa_minus_per_config_points"]["1"] == pytest.approx(-0.625)
    assert s["median_coa_minus_per_config_points"] == pytest.approx(
        (s["coa_minus_per_config_points"]["0"] - 0.625) / 2
    )
    assert "coa_over_per_config" not in s
    md = (tmp_path / "seed_spread_minilm.md").read_text()
    assert "| 1 | this run | 6.00 | 96.88 | 97.50 | -0.62 |" in md
    assert ss.report(res) == md


def test_seed_spread_with_a_lever_writes_its_own_file(tmp_path: Path, monkeypatch) -> None:
    """``--lever`` gives every method the lever, writes a file of its own (the recipe's seeds
    stay as they are), and will not take the full run, trained without it, as seed 0."""
    import benchmarks.common as common
    import benchmarks.seed_spread as ss

    shutil.copy(RESULTS / "baselines_smollm2.json", tmp_path)
    monkeypatch.setattr(common, "RESULTS", tmp_path)
    monkeypatch.setattr(ss, "RESULTS", tmp_path)
    calls: list[tuple[tuple[str, ...], dict, int]] = []

    def fake_run(model, quick, threads, methods, levers, budgets, seed):  # noqa: ANN001
        calls.append((tuple(methods), levers, seed))
        ppl = {"coa-lora": 45.0, "per-config-lora": 50.0, "shared-lora": 48.0}
        return {
            "budgets": list(budgets),
            "bits": [2.5],
            "curves": {m: [(budgets[0], ppl[m] + seed)] for m in methods},
            "train_seconds": {m: 10.0 for m in methods},
        }

    monkeypatch.setattr(ss, "run_baselines", fake_run)
    pair = ["--lever", "low_bit_rank=16"]
    assert ss.main([*pair, "--seeds", "1", "--with-full-run"]) == 2  # trained without the pair
    assert ss.main(["--lever", "low_bit_rank=x", "--seeds", "1"]) == 2
    assert ss.main(["--lever", "no_such=1", "--seeds", "1"]) == 2
    assert calls == [] and not list(tmp_path.glob("seed_spread_*"))
    assert ss.main([*pair, "--seeds", "0,1", "--shared"]) == 0
    assert calls == [
        (("coa-lora", "per-config-lora", "shared-lora"), {"low_bit_rank": 16}, s) for s in (0, 1)
    ]
    assert not (tmp_path / "seed_spread_smollm2.json").exists()
    res = json.loads((tmp_path / "seed_spread_smollm2_low_bit_rank16.json").read_text())
    s = res["summary"]
    assert s["levers"] == {"low_bit_rank": 16}
    assert s["coa_over_shared"] == {"0": 45 / 48, "1": 46 / 49}
    assert s["median_coa_over_shared"] == pytest.approx((45 / 48 + 46 / 49) / 2)
    md = (tmp_path / "seed_spread_smollm2_low_bit_rank16.md").read_text()
    assert '{"low_bit_rank": 16}' in md and ss.report(res) == md
    assert ss.main([*pair, "--seeds", "1", "--add", "--shared"]) == 2  # already there
    assert ss.main([*pair, "--seeds", "2", "--add", "--shared"]) == 0
    res = json.loads((tmp_path / "seed_spread_smollm2_low_bit_rank16.json").read_text())
    assert res["summary"]["seeds"] == [0, 1, 2]
    # CoA-LoRA against Shared-LoRA alone: the per-configuration LoRA left out
    assert ss.main(["--seeds", "1", "--no-per-config", "--shared"]) == 2  # the recipe's own file
    assert ss.main([*pair, "--seeds", "3", "--add", "--shared", "--no-per-config"]) == 0
    assert calls[-1] == (("coa-lora", "shared-lora"), {"low_bit_rank": 16}, 3)
    res = json.loads((tmp_path / "seed_spread_smollm2_low_bit_rank16.json").read_text())
    s = res["summary"]
    assert set(s["coa_over_per_config"]) == {"0", "1", "2"} and s["coa_over_shared"]["3"] == 48 / 51
    md = (tmp_path / "seed_spread_smollm2_low_bit_rank16.md").read_text()
    assert "| 3 | this run | 2.50 | 48.00 | – | – | 10 | – | 51.00 | 0.941 | 10 |" in md
    assert ss.main([*pair, "--seeds", "4", "--shared", "--no-per-config"]) == 0  # a fresh file
    s = json.loads((tmp_path / "seed_spread_smollm2_low_bit_rank16.json").read_text())["summary"]
    assert s["coa_over_per_config"] == {} and s["median_coa_over_per_config"] is None
    md = (tmp_path / "seed_spread_smollm2_low_bit_rank16.md").read_text()
    assert md.startswith("# CoA-LoRA / Shared-LoRA at 2.5 bits") and "Median ratio" not in md


def test_lora_cost_report() -> None:
    from benchmarks.lora_cost import report

    assert report(_json("lora_cost")) == (RESULTS / "lora_cost.md").read_text(encoding="utf-8")


def test_configured_head_report() -> None:
    from benchmarks.configured_head import report

    assert report(_json("configured_head")) == (RESULTS / "configured_head.md").read_text(
        encoding="utf-8"
    )


def test_prepacked_memory_report_and_the_plans_factors() -> None:
    from benchmarks.prepacked_memory import render
    from coalora.runtime.plan import PREPACKED_FACTOR

    res = _json("prepacked_memory")
    assert render(res) == (RESULTS / "prepacked_memory.md").read_text(encoding="utf-8")
    # the plan's factor for each width is at least the largest measured ratio
    for bits, r in res["summary"]["prepacked_over_stored"].items():
        assert PREPACKED_FACTOR[int(bits)] >= r["max"]


def test_speed_prediction_report(tmp_path: Path) -> None:
    from benchmarks.speed_prediction import report

    res = _json("speed_prediction")
    out = tmp_path / "speed_prediction.md"
    out.write_text(report(res, res["command"]), encoding="utf-8")
    _same(out, "speed_prediction")


def test_contention_report(tmp_path: Path) -> None:
    from benchmarks.contention import report

    res = _json("contention")
    out = tmp_path / "contention.md"
    out.write_text(report(res, res["command"]), encoding="utf-8")
    _same(out, "contention")


def test_robustness_report(tmp_path: Path) -> None:
    from benchmarks.robustness import render

    res = _json("robustness")
    out = tmp_path / "robustness.md"
    out.write_text(render(res), encoding="utf-8")
    _same(out, "robustness")
    s = res["summary"]
    assert set(s) >= {
        "cases",
        "handled_right",
        "tracebacks",
        "wrong_exit_codes",
        "auto_budget_peak_vs_cgroup_limit",
    }
    assert s["tracebacks"] == 0 and s["wrong_exit_codes"] == 0


def test_scaleout_report(tmp_path: Path) -> None:
    from benchmarks.scaleout import write_md

    out = tmp_path / "scaleout.md"
    write_md(_json("scaleout"), out=out)
    _same(out, "scaleout")
    summary = _json("scaleout")["summary"]
    assert {"step_seconds_1proc", "step_seconds_2proc", "speedup_2proc"} <= set(summary)
    assert summary["gpu_ratio"] is not None or summary["gpu_reason"]


def test_quantizer_quality_keeps_only_comparable_rows(tmp_path: Path, monkeypatch) -> None:
    """``--keep`` takes the committed rows of other quantizers only when they were measured
    with the same settings and held-out batches."""
    import benchmarks.quantizer_quality as qq

    committed = _json("quantizer_quality")
    monkeypatch.setattr(qq, "RESULTS", tmp_path)
    (tmp_path / "quantizer_quality.json").write_text(json.dumps(committed), encoding="utf-8")
    fresh_row = next(iter(committed["perplexity"]))

    def one_row(**settings) -> dict:
        return {
            "perplexity": {fresh_row: committed["perplexity"][fresh_row]},
            "seconds": {},
            "settings": {**committed["settings"], **settings},
            "held_out": committed["held_out"],
        }

    same = one_row()
    qq.keep(same)
    assert sorted(same["perplexity"]) == sorted(committed["perplexity"])
    other = one_row(eval_batches=-1)
    qq.keep(other)
    assert list(other["perplexity"]) == [fresh_row] and "kept" not in other


def test_baselines_probe_flags_are_typed_and_never_replace_the_committed_report() -> None:
    from benchmarks.baselines import main, parse_budgets, parse_levers, parse_settings

    assert parse_levers(["sampler=floor", "theta_lr_scale=5"]) == {
        "sampler": "floor",
        "theta_lr_scale": 5.0,
    }
    for bad in ("sampler", "nope=1", "theta_lr_scale=fast"):
        with pytest.raises(ValueError, match="--lever"):
            parse_levers([bad])
    assert parse_settings("smollm2", ["steps_per_epoch=0", "val_fraction=0.2"]) == {
        "steps_per_epoch": 0,
        "val_fraction": 0.2,
    }
    for bad in ("steps_per_epoch", "quantizer=gptq", "steps=many"):  # levers go by --lever
        with pytest.raises(ValueError, match="--setting"):
            parse_settings("smollm2", [bad])
    assert parse_budgets("2.5,4") == (2.5, 4.0) and parse_budgets(None) == ()
    for bad in ("", "2.5,2.5", "0", "-3", "nan", "inf", "3bits"):
        with pytest.raises(ValueError, match="--budgets"):
            parse_budgets(bad)
    committed = (RESULTS / "baselines_smollm2.json").read_bytes()
    for argv in (
        ["--model", "smollm2", "--lever", "sampler=floor"],
        ["--model", "smollm2", "--methods", "coa-lora"],
        ["--model", "smollm2", "--setting", "steps_per_epoch=0"],
        ["--model", "smollm2", "--seed", "2"],
        ["--model", "smollm2", "--budgets", "2.5"],
        ["--model", "smollm2", "--seed", "-1", "--out-dir", "/nonexistent"],
        ["--model", "smollm2", "--budgets", "x", "--out-dir", "/nonexistent"],
        ["--model", "smollm2", "--methods", "coa-lora,nope", "--out-dir", "/nonexistent"],
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2
    assert (RESULTS / "baselines_smollm2.json").read_bytes() == committed


def test_quality_ablation_default_row_is_the_exporters_recipe() -> None:
    from benchmarks.baselines import LEVERS_BEFORE, levers_of
    from benchmarks.quality_ablation import LEVERS, recipe
    from coalora.export.options import ExportOptions

    # every lever row changes only lever fields, so recipes compose over LEVERS_BEFORE
    assert all(set(fields) <= set(LEVERS_BEFORE) for fields in LEVERS.values())
    # the default row sets every lever as `coalora export train smollm2` would, not as
    # LEVERS_BEFORE left it
    opts = ExportOptions.for_model("smollm2", out="unused")
    assert recipe(["default"]) == levers_of(opts)
    assert recipe(["default"]) != LEVERS_BEFORE
