"""The export job end to end on a tiny LLaMA saved to disk: bundle, reuse, bad input, CLI,
and the baselines harness."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

from coalora.export.baselines import METHODS, run_baselines
from coalora.export.cli import app
from coalora.export.models import tiny_llama, tiny_tokenizer
from coalora.export.pipeline import ExportError, ExportOptions, run_export
from coalora.export.sweep import SweepError, sweep_budgets
from coalora.runtime.format.pareto import ParetoSet
from coalora.runtime.format.reader import Bundle
from coalora.runtime.format.spec import Key, Training

WORDS = ["the", "cat", "sat", "on", "a", "mat", "ran", "to", "red", "house", "near", "old", "tree"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    model_dir = root / "tiny-llama"
    tiny_llama().save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    rng = random.Random(0)
    data = root / "text.jsonl"
    with data.open("w") as f:
        for _ in range(48):
            f.write(json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(24))}) + "\n")
    return {"model": model_dir, "data": data}


def _opts(inputs: dict[str, Path], tmp_path: Path, **kw) -> ExportOptions:
    values = dict(
        model=str(inputs["model"]),
        data=str(inputs["data"]),
        work_dir=tmp_path / "work",
        steps=4,
        batch_size=4,
        seq_len=32,
        rank=4,
        steps_per_epoch=2,
        proposals_per_epoch=2,
        search_candidates=16,
        initial_budgets=5,
        eval_batches=1,
        calib_texts=4,
        calib_len=48,
        options=("2b64", "4b64", "8b64"),
        sweep_step=1.0,
        sweep_random=2,
        # 4 steps of "floor" train the cheapest configuration alone enough that, on a random
        # model, it dominates the set; the plumbing tested here wants a set of several
        sampler="sandwich",
        progress=False,
    )
    values.update(kw)
    return ExportOptions(out=tmp_path / "bundle", **values)


def test_each_matrix_is_quantized_once_per_option(inputs, tmp_path, monkeypatch):
    """The residual init, the cost table, training, the sweep and the bundle share one
    quantization of each (matrix, option): with gptq it is most of a fresh export's time."""
    from coalora.export.coa_lora import layer as layer_module

    calls: list[tuple[tuple[int, ...], float, str]] = []
    real = layer_module.quantize_matrix

    def counted(w, option, *args, **kwargs):
        calls.append((w.shape, float(abs(w).sum()), option.name))
        return real(w, option, *args, **kwargs)

    monkeypatch.setattr(layer_module, "quantize_matrix", counted)
    opts = _opts(inputs, tmp_path, quantizer="gptq")
    res = run_export(opts)
    assert Bundle.open(res.bundle, verify="all")
    n_matrices = len(Bundle.open(res.bundle).space.matrices)
    assert len(calls) == len(set(calls)) == n_matrices * len(opts.options)


def test_export_end_to_end_then_reuse(inputs, tmp_path, caplog):
    opts = _opts(inputs, tmp_path)
    res = run_export(opts)

    bundle = Bundle.open(res.bundle, verify="all")
    pareto = ParetoSet.from_dict(bundle.pareto_dict(), bundle.space)  # validates every entry
    assert len(pareto) >= 2 and pareto.metric_name == "perplexity"
    assert not pareto.higher_is_better
    for e in pareto.entries:
        assert bundle.space.validate(e.config) == e.config
    assert pareto.front().entries == pareto.entries  # only non-dominated ones ship
    assert any(not p["seen_in_training"] for p in res.evaluated)  # unseen ones were measured
    training = bundle.manifest[Key.TRAINING]
    assert training["steps"] == 4 and training["split"]["seed"] == 0
    assert training["split"]["train"] + training["split"]["val"] == 48
    assert set(res.phases) >= {"data", "calibration", "train", "sweep", "export"}
    assert not any(res.reused.values())
    assert (res.work_dir / "train" / "checkpoint" / "trainer.json").is_file()

    # A second run with the same options reuses every slow phase and trains nothing.
    opts.overwrite = True
    caplog.set_level(logging.INFO, logger="coalora.export.pipeline")
    again = run_export(opts)
    assert all(again.reused.values()), again.reused
    assert "reusing checkpoint at step 4: no training" in caplog.text
    log_text = (again.work_dir / "export.log").read_text()
    assert "reusing calibration" in log_text and "reusing the sweep" in log_text
    assert again.phases["train"] < res.phases["train"]
    assert [e.bits for e in again.pareto.entries] == [e.bits for e in res.pareto.entries]
    Bundle.open(again.bundle, verify="all")

    # more held-out batches for the sweep: the adapter is reused, only the sweep runs again
    opts.sweep_batches = 3
    wider = run_export(opts)
    assert wider.reused["train"] and not wider.reused["sweep"], wider.reused
    record = Bundle.open(wider.bundle).manifest[Key.TRAINING]
    measured = record[Training.SWEEP][Training.SWEEP_HELD_OUT_BATCHES]
    assert measured == 3 and opts.eval_batches == 1
    opts.sweep_batches = None

    # the same work dir with other training options is refused, the bundle left as it was
    with pytest.raises(ExportError, match=r"other options \(steps\)"):
        run_export(_opts(inputs, tmp_path, steps=5, overwrite=True))
    Bundle.open(again.bundle, verify="all")

    # fresh ignores the cache
    opts.fresh = True
    assert not any(run_export(opts).reused.values())


def test_bad_inputs_leave_no_output(inputs, tmp_path):
    out = tmp_path / "bundle"
    with pytest.raises(ExportError, match="cannot load model"):
        run_export(_opts(inputs, tmp_path, model=str(tmp_path / "nope")))
    assert not out.exists() and not (tmp_path / "work").exists()

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": broken\n')
    with pytest.raises(ExportError, match=r"bad\.jsonl:3: invalid JSON"):
        run_export(_opts(inputs, tmp_path, data=str(bad)))
    assert not out.exists() and not (tmp_path / "work").exists()

    with pytest.raises(ExportError, match="sweep"):
        run_export(_opts(inputs, tmp_path, sweep_lo=12.0, sweep_hi=16.0))
    with pytest.raises(ExportError, match="impossible sweep budgets"):
        run_export(_opts(inputs, tmp_path, sweep_lo=6.0, sweep_hi=3.0))
    assert not out.exists()

    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="already exists"):
        run_export(_opts(inputs, tmp_path))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_sweep_budgets_clip_to_the_space():
    from coalora.export.models import config_space
    from coalora.kernels import QuantOption

    space = config_space(tiny_llama(), [QuantOption(2, 64), QuantOption(4, 64)])
    budgets = sweep_budgets(space, 2.5, 8.0, 0.25)
    assert budgets[0] == pytest.approx(space.min_bits())
    assert budgets[-1] == pytest.approx(space.max_bits())
    assert all(space.min_bits() <= b <= space.max_bits() for b in budgets)
    with pytest.raises(SweepError, match="misses"):
        sweep_budgets(space, 9.0, 12.0)


def test_cli_export_train(inputs, tmp_path):
    out = tmp_path / "cli-bundle"
    args = ["export", "train", str(inputs["model"]), "--out", str(out)]
    args += ["--data", str(inputs["data"]), "--work-dir", str(tmp_path / "work"), "--fast"]
    args += ["--steps", "2", "--steps-per-epoch", "0", "--seq-len", "32", "--rank", "4"]
    args += ["--calib-texts", "2", "--budgets", "2.5:8:1.5", "--random-configs", "1", "-q"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "Pareto set:" in result.output and "time per phase" in result.output
    Bundle.open(out, verify="all")

    # the same command again: the bundle exists, one line on stderr, exit 2
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2
    assert "already exists" in again.output and "Traceback" not in again.output

    other = str(tmp_path / "other")
    missing = CliRunner().invoke(app, ["export", "train", "no-such-model", "--out", other])
    assert missing.exit_code == 2 and "cannot load model" in missing.output


def test_baselines_give_a_metric_per_method_and_budget(inputs, tmp_path):
    opts = _opts(inputs, tmp_path, steps=2, steps_per_epoch=0)
    budgets = [3.5, 5.0]
    res = run_baselines(opts, budgets)
    assert set(res.curves) == set(METHODS) == set(res.train_seconds)
    for method, points in res.curves.items():
        assert len(points) == len(budgets), method
        assert all(p[1] > 0 for p in points)
    assert res.metric_name == "perplexity"
    assert res.bits == sorted(res.bits) and res.bits[0] <= 3.5
    assert res.train_seconds["no-lora"] == 0.0  # an LM has no head to train
    assert res.train_seconds["per-config-lora"] > 0
    json.dumps(res.to_dict())


def test_baselines_measure_on_batches_the_search_did_not_see(inputs, tmp_path):
    from benchmarks.baselines import targets

    opts = _opts(inputs, tmp_path, steps=3, steps_per_epoch=1)
    res = run_baselines(opts, [3.5, 5.0], methods=("coa-lora", "per-config-lora"), eval_batches=2)
    assert res.eval_examples == 2 * opts.batch_size  # the two batches after the search's one
    assert len(res.coa_budget_seen) == 2
    assert res.coa_seen_allocations, "the starting allocations near the budgets are measured"
    # a search between each two of the 3 one-step epochs, its seconds part of the fine-tuning's
    assert [e["epoch"] for e in res.coa_search_epochs] == [0, 1]
    assert 0 < sum(e["seconds"] for e in res.coa_search_epochs) < res.train_seconds["coa-lora"]
    assert all(v > 0 for _, v in res.coa_seen_allocations)
    t = targets(res.to_dict())
    assert len(t["vs_per-config-lora"]) == 2 and len(t["within_per_config"]) == 2
    assert t["coa_vs_3_per_config"] > 0
    with pytest.raises(ExportError, match="eval-batches"):
        run_baselines(opts, [3.5], methods=("no-lora",), eval_batches=0)


def test_baselines_build_every_quantized_weight_before_any_clock(inputs, tmp_path, monkeypatch):
    """With the cost table read back from the work dir, no method's seconds include quantizing:
    the weights are built before any clock (lazily, CoA-LoRA, timed first, paid for them all)."""
    import coalora.export.coa_lora as coa_pkg
    import coalora.export.coa_lora.layer as layer_mod

    opts = _opts(inputs, tmp_path, steps=1, steps_per_epoch=0)
    run_baselines(opts, [3.5], methods=("no-lora",))  # writes the cost table to the work dir
    training = [False]
    quantized_while_training: list[str] = []
    real_quantize, real_train = layer_mod.quantize_matrix, coa_pkg.train

    def quantize(*args, **kw):
        if training[0]:
            quantized_while_training.append(str(args[1]))
        return real_quantize(*args, **kw)

    def timed_train(*args, **kw):
        training[0] = True
        try:
            return real_train(*args, **kw)
        finally:
            training[0] = False

    monkeypatch.setattr(layer_mod, "quantize_matrix", quantize)
    monkeypatch.setattr(coa_pkg, "train", timed_train)
    res = run_baselines(opts, [3.5], methods=("coa-lora", "shared-lora"))
    assert quantized_while_training == []
    assert res.prepare_seconds > 0 and res.to_dict()["prepare_seconds"] == res.prepare_seconds


def test_baselines_measure_coa_lora_final_set_for_its_hypervolume(inputs, tmp_path):
    from benchmarks.quality_ablation import hypervolumes

    opts = _opts(inputs, tmp_path, steps=2, steps_per_epoch=1)
    res = run_baselines(opts, [3.5], methods=("coa-lora",), measure_final_set=True)
    assert res.coa_final_set, "every configuration of the last training set is measured"
    assert all(b >= 2.0 and m > 0 for b, m in res.coa_final_set)
    assert not run_baselines(opts, [3.5], methods=("coa-lora",)).coa_final_set  # off by default
    # a set that dominates another has the larger area against the one shared reference
    worse = [[b, m * 1.5] for b, m in res.coa_final_set]
    rows = [
        {"variant": "found", "final_set": res.coa_final_set},
        {"variant": "worse", "final_set": worse},
        {"variant": "old row"},
    ]
    hv, ref = hypervolumes(rows)
    assert set(hv) == {"found", "worse"} and hv["found"] > hv["worse"] > 0
    assert ref[0] > max(b for b, _ in res.coa_final_set)


def test_export_classifier_from_labelled_jsonl(tmp_path):
    from coalora.export.models import tiny_bert

    model_dir = tmp_path / "tiny-bert"
    tiny_bert(num_labels=2).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    data = tmp_path / "labelled.jsonl"
    rng = random.Random(1)
    with data.open("w") as f:
        for i in range(40):
            label = ["sport", "tech"][i % 2]
            words = " ".join(rng.choice(WORDS) for _ in range(8))
            f.write(json.dumps({"text": f"{label} {words}", "label": label}) + "\n")
    opts = _opts({"model": model_dir, "data": data}, tmp_path, sweep_random=1)
    res = run_export(opts)
    assert res.record["task"] == "classify"
    bundle = Bundle.open(res.bundle, verify="all")
    pareto = ParetoSet.from_dict(bundle.pareto_dict(), bundle.space)
    assert pareto.metric_name == "accuracy" and pareto.higher_is_better
    assert all(0.0 <= e.metric <= 1.0 for e in pareto.entries)
    assert bundle.labels == ["sport", "tech"]


def test_presets_layer_model_fast_and_overrides():
    lm = ExportOptions.for_model("smollm2", "out", fast=True)
    # SmolLM2's own fast row trains longer, with the fast row's 3 searches
    assert (lm.steps, lm.steps_per_epoch, lm.batch_size, lm.eval_batches) == (72, 18, 2, 2)
    gemma = ExportOptions.for_model("gemma3", "out", fast=True)
    assert (gemma.steps, gemma.steps_per_epoch) == (16, 4)
    # a classifier's fast preset measures accuracy on 8x more held-out articles
    clf = ExportOptions.for_model("MiniLM", "out", fast=True)
    assert (clf.steps, clf.batch_size, clf.eval_batches, clf.val_fraction) == (16, 8, 4, 0.2)
    assert ExportOptions.for_model("minilm", "out", fast=True, batch_size=4).batch_size == 4
    assert ExportOptions.for_model("minilm", "out").batch_size == 16
    with pytest.raises(ExportError, match="unknown export option"):
        ExportOptions.for_model("minilm", "out", nonsense=1)
