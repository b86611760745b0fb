"""The tied embedding / LM head as a matrix of the configuration (``--head-options``).

A tiny LLaMA is trained and exported with its head at 8b32 (the default) and 4b32. The sweep
measures every stored configuration with each head; the bundle ships both heads; each
Pareto entry names its head, its bytes count it and its bits do not; the memory plan counts
the head the configuration names, and the device serves that head (logits as torch computes
them with the same table and head).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from coalora.export.exporter import DEFAULT_LM_HEAD, head_codes, serving_head
from coalora.export.models import tiny_llama
from coalora.export.options import ExportError, ExportOptions
from coalora.kernels import ConfigError, QuantOption
from coalora.kernels.config import HEAD_KEY
from coalora.kernels.matmulnbits import dequantize
from coalora.runtime.format.pareto import ParetoError, ParetoSet
from coalora.runtime.format.reader import Bundle, BundleError
from coalora.runtime.format.spec import MANIFEST, PARETO_FILE, Arch, Key, head_file

SMALL = QuantOption(4, 32)
PROMPT_IDS = [5, 9, 17, 33, 8, 12]


@pytest.fixture(scope="module")
def head_bundle(tmp_path_factory: pytest.TempPathFactory):
    from tests.bundles import train_decoder_bundle

    out = tmp_path_factory.mktemp("head") / "bundle"
    return train_decoder_bundle(tiny_llama(), "tiny-llama", out, 6, head_options=(SMALL,))


def _entries(bundle: Bundle) -> ParetoSet:
    return ParetoSet.from_dict(bundle.pareto_dict(), bundle.space)


def _torch_logits(model, config, head: QuantOption) -> np.ndarray:
    model.set_mode("quant")
    model.set_configuration(config.with_head(None))
    with serving_head(model.base, head), torch.no_grad():
        return model(input_ids=torch.tensor([PROMPT_IDS])).logits[0, -1].numpy()


def test_the_bundle_ships_each_head_and_every_entry_names_one(head_bundle) -> None:
    path, model = head_bundle
    b = Bundle.open(path, verify="all")
    space = b.space
    assert space.head_options == (SMALL, DEFAULT_LM_HEAD)
    assert space.head is not None and space.head.shape == (320, 96)
    assert b.lm_head == DEFAULT_LM_HEAD.name
    # the default head stays in the base file; the other is a file of its own
    assert "lm_head.qweight" in b.base_tensors()
    assert head_file(SMALL) in b.manifest[Key.FILES]
    assert head_file(DEFAULT_LM_HEAD) not in b.manifest[Key.FILES]
    entries = _entries(b).entries
    heads = [e.config.head for e in entries]
    assert None not in heads and SMALL in heads and DEFAULT_LM_HEAD in heads
    for e in entries:
        # bits are the body's; bytes count the head the entry names
        assert e.bits == pytest.approx(space.bits(e.config))
        assert e.nbytes == space.body_nbytes(e.config) + e.config.head.nbytes(320, 96)
    # the shipped codes are the ones the sweep measured with
    small = b._load(head_file(SMALL))
    assert np.array_equal(small["lm_head.qweight"], head_codes(model.base, SMALL).b)


def test_the_plan_counts_the_head_a_configuration_names(head_bundle) -> None:
    from coalora.runtime.engine import Runtime

    path, _ = head_bundle
    rt = Runtime.open(path, budget="auto", threads=1, context_length=64, build=False)
    entries = _entries(rt.bundle).entries
    config = entries[0].config
    big, small = config.with_head(DEFAULT_LM_HEAD), config.with_head(SMALL)
    gap = rt.plan(big).total - rt.plan(small).total
    want = rt.accountant.head_bytes[DEFAULT_LM_HEAD] - rt.accountant.head_bytes[SMALL]
    assert gap == want > 0
    # a configuration naming no head is planned with the default one
    assert rt.plan(config.with_head(None)).total == rt.plan(big).total
    rt.close()


def _tight_budget(path: Path, **graph) -> str:
    """The plan of the cheapest configuration with the smaller head, as a byte budget, for a
    runtime opened with ``graph``; below every plan with the default head."""
    from coalora.runtime.engine import Runtime

    dry = Runtime.open(path, budget="auto", threads=1, context_length=64, build=False, **graph)
    plans = {e.config: dry.plan(e.config).total for e in _entries(dry.bundle).entries}
    dry.close()
    budget = min(v for c, v in plans.items() if c.head == SMALL)
    # below every configuration with the default head: without the smaller head, refused
    assert budget < min(v for c, v in plans.items() if c.head == DEFAULT_LM_HEAD)
    return f"{budget}B"


def test_a_tight_memory_budget_is_served_by_the_smaller_head(head_bundle) -> None:
    from coalora.runtime.engine import Runtime
    from tests.test_runtime import _first_logits

    path, model = head_bundle
    exact_graph = {"lora_bits": 32, "accuracy_level": 0}
    budget = _tight_budget(path, **exact_graph)
    exact = Runtime.open(path, budget=budget, threads=1, context_length=64, **exact_graph)
    assert exact.config.head == SMALL
    assert "with a 4b32 LM head" in exact.selection.reason
    want = _torch_logits(model, exact.config, SMALL)
    diff = np.abs(_first_logits(exact, PROMPT_IDS) - want).max()
    assert diff < 1e-4 * np.abs(want).max()
    # the default head gives other logits: the graph did read the smaller one
    other = _torch_logits(model, exact.config, DEFAULT_LM_HEAD)
    assert np.abs(other - want).max() > 10 * diff
    fast = Runtime.open(path, budget=_tight_budget(path), threads=1, context_length=64)
    assert fast.config.head == SMALL
    want = _torch_logits(model, fast.config, SMALL)
    got = _first_logits(fast, PROMPT_IDS)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()
    assert 1 <= len(fast.generate_ids(PROMPT_IDS, 4)) <= 4
    for rt in (exact, fast):
        rt.close()


def test_the_head_table_is_the_named_heads_codes(head_bundle) -> None:
    path, model = head_bundle
    table = model.base.get_input_embeddings().weight
    before = table.detach().clone()
    with serving_head(model.base, SMALL) as q:
        assert torch.equal(table, torch.from_numpy(dequantize(q)))
        assert not torch.equal(table, before)
    assert torch.equal(table, before)  # the table as trained comes back


def test_bad_head_options_are_refused() -> None:
    def opts(**kw) -> ExportOptions:
        return ExportOptions.for_model("tiny-llama", out="unused", **kw)

    with pytest.raises(ExportError, match="below the head's floor of 4 bits"):
        opts(head_options="2b64").check()
    with pytest.raises(ExportError, match="needs a quantized --lm-head"):
        opts(head_options="4b64", lm_head="none").check()
    with pytest.raises(ExportError, match="bad --head-options"):
        opts(head_options="4bits").check()
    assert opts(head_options="4b64,8b32").head_option_list() == (
        DEFAULT_LM_HEAD,
        QuantOption(4, 64),
    )
    # not part of what trains: the work directory is the same with or without
    assert opts(head_options="4b64").training_key() == opts().training_key()


def test_a_damaged_configured_head_is_refused(head_bundle, tmp_path: Path) -> None:
    path, _ = head_bundle
    space = Bundle.open(path).space
    with pytest.raises(ConfigError, match="not offered"):
        space.config_from_dict(
            {**_entries(Bundle.open(path)).entries[0].config.to_dict(), HEAD_KEY: "8b64"}
        )
    # a Pareto entry naming a head in a bundle without a configured head
    plain = space.__class__(space.matrices, space.options)
    data = Bundle.open(path).pareto_dict()
    with pytest.raises(ParetoError, match="no configured head"):
        ParetoSet.from_dict(data, plain)
    # the other head's file gone
    copy = tmp_path / "b"
    shutil.copytree(path, copy)
    (copy / head_file(SMALL)).unlink()
    with pytest.raises(BundleError, match="heads/4b32.safetensors is missing"):
        Bundle.open(copy)
    # a default head that is not one of the head's options
    shutil.rmtree(copy)
    shutil.copytree(path, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest[Key.ARCHITECTURE][Arch.LM_HEAD] = "8b64"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="not one of the head's options"):
        Bundle.open(copy)
    assert (copy / PARETO_FILE).is_file()


def test_inspect_and_slim_carry_the_head(head_bundle, tmp_path: Path) -> None:
    from coalora.export.slim import slim_bundle
    from coalora.runtime.report import bundle_summary
    from coalora.runtime.verify import verify_bundle

    path, _ = head_bundle
    rows = bundle_summary(Bundle.open(path))["pareto"]
    assert any(r["options"].endswith("head 4b32") for r in rows)
    top = max(e.bits for e in _entries(Bundle.open(path)).entries)
    slim = slim_bundle(path, tmp_path / "slim", top)
    b = verify_bundle(slim)
    assert b.space.head_options == (SMALL, DEFAULT_LM_HEAD)
    assert {e.config for e in _entries(b).entries} == {
        e.config for e in _entries(Bundle.open(path)).entries
    }
