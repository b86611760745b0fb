"""coalora eval on the device runtime: teacher-forced perplexity in one pass per block (checked
against token-by-token decoding), accuracy for classifiers, the bundle's own held-out split,
and the export's data errors."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from coalora.runtime import evaluate as ev
from coalora.runtime.data import TextDataset
from coalora.runtime.engine import Runtime

WORDS = "the a news market team film goal vote bank music game win rise fall".split()  # noqa: SIM905


def _write_jsonl(path: Path, n: int, labels: list[str] | None = None) -> Path:
    rng = random.Random(3)
    rows = []
    for i in range(n):
        row = {"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 30)))}
        if labels:
            row["label"] = labels[i % len(labels)]
        rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n")
    return path


def _eval(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "coalora.export.cli", "eval", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def rt_entries(bundle: Path):
    return Runtime.open(bundle, threads=1, build=False).pareto.entries


@pytest.fixture(scope="module")
def lm(tiny_llama_bundle: Path):
    rt = Runtime.open(tiny_llama_bundle, threads=1, context_length=64, build=False, all_logits=True)
    yield rt
    rt.close()


def test_one_pass_perplexity_matches_token_by_token(lm: Runtime, tmp_path: Path) -> None:
    rows = _write_jsonl(tmp_path / "d.jsonl", 6).read_text().splitlines()
    texts = [json.loads(x)["text"] for x in rows]
    blocks = ev.lm_blocks(lm, texts, 24)
    assert len(blocks) >= 3
    entry = sorted(lm.pareto.entries, key=lambda e: e.bits)[1]
    data = ev.HeldOut("test", TextDataset(texts), 24)
    (result,) = ev.evaluate(lm, [entry], data, progress=False)
    assert lm.config == entry.config
    assert result.measured_on == blocks.size - len(blocks)

    # The same NLL, one token at a time through the KV cache (the decoding path).
    dec = lm._decoder
    total, count = 0.0, 0
    for block in blocks:
        for t in range(1, len(block)):
            logits = dec.run(np.asarray([[block[t - 1]]], dtype=np.int64), t)
            z = logits.astype(np.float64) - logits.max()
            total += math.log(np.exp(z).sum()) - z[block[t]]
            count += 1
    assert result.metric == pytest.approx(math.exp(total / count), rel=2e-3)


def test_eval_command_lm_json_and_plot(tiny_llama_bundle: Path, tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "held.jsonl", 12)
    png = tmp_path / "eval.png"
    out = _eval(
        str(tiny_llama_bundle),
        "--data",
        str(data),
        "--configs",
        "3.5,6,32",
        "--seq-len",
        "16",
        "--json",
        "--plot",
        str(png),
        "--quiet",
        "--threads",
        "1",
    )
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    rows = rep["configurations"]
    # 6 and 32 bits pick the same (best) configuration: measured once.
    best = min(rt_entries(tiny_llama_bundle), key=lambda e: e.metric)
    assert rep["metric_name"] == "perplexity" and len(rows) == 2
    assert rows[1]["bits"] == pytest.approx(best.bits)
    assert [r["bits"] for r in rows] == sorted(r["bits"] for r in rows)
    for r in rows:
        assert 1 < r["perplexity"] < 1e4 and r["stored_perplexity"] > 1
        assert r["ratio_to_stored"] == pytest.approx(r["perplexity"] / r["stored_perplexity"])
    assert "all of" in rep["data"]["description"]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_eval_classifier_accuracy(tiny_bert_bundle: Path, tmp_path: Path) -> None:
    data = _write_jsonl(tmp_path / "cls.jsonl", 9, ["sport", "business", "tech"])
    out = _eval(
        str(tiny_bert_bundle),
        "--data",
        str(data),
        "--configs",
        "all",
        "--json",
        "--quiet",
        "--threads",
        "1",
    )
    assert out.returncode == 0, out.stderr
    rep = json.loads(out.stdout)
    assert rep["metric_name"] == "accuracy"
    rt = Runtime.open(tiny_bert_bundle, threads=1, build=False)
    rows = {r["bits"]: r for r in rep["configurations"]}
    assert len(rows) == len(rt.pareto.entries)
    ds = [json.loads(x) for x in data.read_text().split("\n") if x]
    entry = min(rt.pareto.entries, key=lambda e: e.bits)
    rt.use(ev._selection_of(rt, entry))
    manual = sum(rt.classify(r["text"], max_length=128).label == r["label"] for r in ds) / len(ds)
    assert rows[entry.bits]["accuracy"] == pytest.approx(manual)
    rt.close()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"text": "a", "label": "sport"}\n{bad\n', "invalid JSON"),
        ('{"txt": "a"}\n', "missing field 'text'"),
        ('{"text": "a", "label": "nope"}\n{"text": "b", "label": "sport"}\n', "not one of"),
    ],
)
def test_bad_data_is_one_error_line(
    tiny_bert_bundle: Path, tmp_path: Path, content: str, message: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    out = _eval(str(tiny_bert_bundle), "--data", str(path), "--quiet")
    assert out.returncode == 2
    assert out.stderr.startswith("error: ") and out.stderr.strip().count("\n") == 0
    assert message in out.stderr


def test_bad_configs_and_missing_data(tiny_llama_bundle: Path, tmp_path: Path) -> None:
    out = _eval(str(tiny_llama_bundle), "--data", str(tmp_path / "none.jsonl"))
    assert out.returncode == 2 and "no such file" in out.stderr
    data = _write_jsonl(tmp_path / "d.jsonl", 4)
    for spec, message in (("lots", "cannot read --configs"), ("1", "no stored configuration")):
        out = _eval(str(tiny_llama_bundle), "--data", str(data), "--configs", spec)
        assert out.returncode == 2 and message in out.stderr, out.stderr


def test_the_bundles_own_split_and_stored_blocks(lm: Runtime) -> None:
    texts = [f"text number {i} " + " ".join(WORDS[: i % 7 + 3]) for i in range(40)]
    ds = TextDataset(texts)
    # What the exporter records: a --limit subsample, then the held-out indices.
    keep = sorted(int(i) for i in np.random.default_rng(5).permutation(40)[:30])
    used = ds.subset(keep)
    record = {
        "data": {"sha256": ev._digest({"texts": used.texts, "labels": used.labels})},
        "split": {"seed": 5, "val_indices": [1, 4, 9, 20]},
        "options": {"limit": 30, "seq_len": 8, "batch_size": 2, "eval_batches": 1},
        "sweep": {"held_out_batches": 2, "disjoint_from_search": True},
    }
    val, n_search, n_measure = ev._bundle_split(ds, record)
    assert val.texts == [used.texts[i] for i in (1, 4, 9, 20)]
    assert (n_search, n_measure) == (1, 2)
    record["data"]["sha256"] = "0" * 64  # other data: evaluated whole
    assert ev._bundle_split(ds, record) is None


def test_logits_needs_an_all_logits_runtime(tiny_llama_bundle: Path) -> None:
    rt = Runtime.open(tiny_llama_bundle, threads=1, context_length=32)
    with pytest.raises(RuntimeError, match="all_logits"):
        rt.logits([1, 2, 3])
    rt.close()
