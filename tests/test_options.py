"""Every export default is written once: in ``ExportOptions`` (with its help text), changed
only by a ``PRESETS`` row that actually changes it; ``CoALoRAConfig`` and the CLI read it."""

from __future__ import annotations

import ast
import inspect
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

import typer

from coalora.export.cli import _flag_help, app
from coalora.export.options import PRESETS, ExportOptions, default_of, presets_for

ROOT = Path(__file__).resolve().parents[1]
# CLI flags whose name differs from the field they set
FLAG_FIELDS = {"random_configs": "sweep_random"}


def _literal(node: ast.expr | None) -> bool:
    """A default written as a value (``3``, ``1e-4``, ``("q", "k")``), not read from elsewhere."""
    return node is not None and isinstance(node, (ast.Constant, ast.Tuple, ast.List, ast.UnaryOp))


def literal_defaults(source: str, cls: str) -> dict[str, bool]:
    """field name -> whether ``cls`` writes its default as a literal."""
    tree = ast.parse(source)
    body = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls).body
    out = {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            value = node.value
            if isinstance(value, ast.Call) and getattr(value.func, "id", "") in ("_opt", "field"):
                # _opt(default, help) / field(default=...): the default inside
                keywords = {k.arg: k.value for k in value.keywords}
                value = value.args[0] if value.args else keywords.get("default")
            out[node.target.id] = _literal(value)
    return out


def redundant_preset_entries(table: dict[str, dict[str, Any]]) -> list[str]:
    """``row.key`` for every preset entry that sets what is beneath it already."""
    found = []
    defaults = {f.name: f.default for f in fields(ExportOptions) if f.default is not MISSING}
    models = [r for r in table if ":" not in r and r != "fast"]
    for model in models:
        below = dict(defaults)
        for row in [model, "fast", f"fast:{model}"]:
            for key, value in table.get(row, {}).items():
                if below.get(key) == value:
                    found.append(f"{row}.{key}")
                below[key] = value
    return sorted(set(found))


def test_coalora_config_reads_the_export_defaults() -> None:
    from coalora.export.coa_lora.config import CoALoRAConfig

    shared = {f.name for f in fields(CoALoRAConfig)} & {f.name for f in fields(ExportOptions)}
    assert shared == {"rank", "alpha", "lr", "configs_per_step", "seed"} | {
        "sampler",
        "lora_init",
        "distill_weight",
        "theta_lr_scale",
        "theta_anchor",
        "low_bit_rank",
    }
    cfg = CoALoRAConfig()
    for name in shared:
        assert getattr(cfg, name) == default_of(name), name
    config_src = (ROOT / "export" / "coa_lora" / "config.py").read_text(encoding="utf-8")
    options_src = (ROOT / "export" / "options.py").read_text(encoding="utf-8")
    in_config = literal_defaults(config_src, "CoALoRAConfig")
    in_options = literal_defaults(options_src, "ExportOptions")
    twice = sorted(n for n in shared if in_config[n] and in_options[n])
    assert not twice, f"defaults written in both CoALoRAConfig and ExportOptions: {twice}"
    assert all(in_options[n] for n in shared)  # ... and it is ExportOptions that writes them


def test_the_literal_checker_sees_a_second_default() -> None:
    src = (
        "class C:\n    lr: float = 1e-4\n    rank: int = default_of('rank')\n    x: int = -1\n"
        "    y: int = _opt(3, 'help')\n    z: int = field(default=default_of('z'))\n"
    )
    assert literal_defaults(src, "C") == {
        "lr": True,
        "rank": False,
        "x": True,
        "y": True,
        "z": False,
    }


def test_no_preset_row_repeats_what_is_beneath_it() -> None:
    assert redundant_preset_entries(PRESETS) == []
    bad = {"smollm2": {"steps": 200}, "fast": {"steps": 16}, "fast:smollm2": {"steps": 16}}
    assert redundant_preset_entries(bad) == ["fast:smollm2.steps", "smollm2.steps"]


def test_presets_give_the_documented_runs() -> None:
    # the values the presets stood for before they became one table
    assert presets_for("smollm2") == {"batch_size": 4, "seq_len": 256}
    smollm2 = ExportOptions.for_model("smollm2", "-")
    assert (smollm2.steps, smollm2.steps_per_epoch, smollm2.eval_batches) == (200, 50, 4)
    minilm = ExportOptions.for_model("minilm", "-")
    assert (minilm.steps, minilm.batch_size, minilm.seq_len, minilm.steps_per_epoch) == (
        300,
        16,
        128,
        75,
    )
    fast = ExportOptions.for_model("minilm", "-", fast=True)
    assert (fast.steps, fast.batch_size, fast.eval_batches, fast.val_fraction) == (16, 8, 4, 0.2)
    assert fast.quantizer == "search" and fast.limit == 300
    demo = ExportOptions.for_model("smollm2", "-", fast=True)
    assert (demo.eval_batches, demo.quantizer, demo.calib_texts) == (2, "gptq", 64)


def test_train_flags_take_their_default_and_help_from_the_fields() -> None:
    train = typer.main.get_command(app).commands["export"].commands["train"]
    names = {f.name for f in fields(ExportOptions)}
    checked = []
    for param in train.params:
        field_name = FLAG_FIELDS.get(param.name, param.name)
        if field_name not in names or param.name in ("model", "out"):
            continue
        if getattr(param, "is_flag", False):
            continue  # --fresh / --overwrite: off unless given
        assert param.default is None, f"--{param.name} writes its own default {param.default!r}"
        assert param.help == _flag_help(field_name), param.name
        checked.append(field_name)
    assert {"data", "task", "lr", "configs_per_step", "sweep_random"} <= set(checked)


def test_every_field_has_help() -> None:
    for f in fields(ExportOptions):
        assert f.metadata.get("help"), f.name
    assert "ExportOptions" in inspect.getsource(ExportOptions.for_model)
