"""A low-bit pair (``--low-bit-rank``) from training through the bundle to the device: the
bundle ships it, the device stacks it under the generated adapter of the matrices a
configuration puts at the lowest bit-width, and decodes as torch computes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from coalora.export.models import tiny_llama
from coalora.runtime.engine import Runtime
from coalora.runtime.format.reader import Bundle, BundleError
from coalora.runtime.format.spec import (
    FORMAT_VERSION,
    LORA_B_LOW,
    LORA_FILE,
    LOW_PAIR_FORMAT_VERSION,
    MANIFEST,
    FileEntry,
    Key,
    Lora,
)
from coalora.runtime.graphs.weights import lora_slots
from coalora.runtime.plan import lora_bytes

RANK, LOW_RANK, LOW_BITS = 4, 3, 2
PROMPT_IDS = [5, 9, 17, 33, 8, 12, 40, 7]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    from bundles import train_decoder_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-low-pair"
    # residual init starts the pair at the residual's next components, far from zero
    return train_decoder_bundle(
        tiny_llama(), "tiny-llama", out, 6, low_bit_rank=LOW_RANK, lora_init="residual"
    )


def _torch_logits(model, config) -> np.ndarray:
    model.set_mode("quant")
    model.set_configuration(config)
    with torch.no_grad():
        return model(input_ids=torch.tensor([PROMPT_IDS])).logits[0, -1].numpy()


def _exact(path: Path, budget: str) -> Runtime:
    return Runtime.open(
        path, budget=budget, threads=1, context_length=64, lora_bits=32, accuracy_level=0
    )


def test_the_bundle_ships_the_pair_as_version_2(trained) -> None:
    path, model = trained
    bundle = Bundle.open(path, verify="all")
    assert bundle.format_version == LOW_PAIR_FORMAT_VERSION != FORMAT_VERSION
    ranks = bundle.lora_ranks
    assert (ranks.rank, ranks.low_rank, ranks.low_bits) == (RANK, LOW_RANK, LOW_BITS)
    lora = bundle.lora_pairs()
    name = model.adapted[0]
    layer = model.layers[name]
    np.testing.assert_array_equal(lora.a_low[name], layer.lora_A_low.detach().numpy())
    np.testing.assert_array_equal(lora.b_low[name], layer.lora_B_low.detach().numpy())
    assert set(lora.a_low) == {m.name for m in bundle.space.matrices}


def test_the_device_stacks_the_pair_where_the_configuration_runs_two_bits(trained) -> None:
    from dataclasses import replace

    from tests.test_runtime import _first_logits

    path, model = trained
    rt = _exact(path, "3.5bits")
    kinds = set()
    try:
        for entry in rt.pareto.entries:  # all 2-bit, 4-bit, 8-bit, and a mix of the three
            rt.use(replace(rt.selection, entry=entry, plan=rt.plan(entry.config)))
            low = {n for n, o in rt.config.items() if o.bits == LOW_BITS}
            kinds.add("none" if not low else "all" if len(low) == len(rt.config) else "some")
            # every LoRA slot is rank r, or r + r_low where its matrices run 2 bits
            slots = lora_slots(rt.session.get_modelmeta().custom_metadata_map)
            assert slots and all(
                s.rank == RANK + (LOW_RANK if set(s.members) <= low else 0) for s in slots
            )
            # the memory plan counts the session's slots as they are
            assert lora_bytes(rt.bundle, 32, rt.config) == sum(s.nbytes() for s in slots)
            got, want = _first_logits(rt, PROMPT_IDS), _torch_logits(model, rt.config)
            diff = np.abs(got - want).max()
            assert diff < 1e-4 * np.abs(want).max(), entry.bits
            if low:
                # without the pair the device would be far off: it matters here
                saved = {n: model.layers[n].lora_B_low.detach().clone() for n in low}
                with torch.no_grad():
                    for n in low:
                        model.layers[n].lora_B_low.zero_()
                    without = _torch_logits(model, rt.config)
                    for n, b in saved.items():
                        model.layers[n].lora_B_low.copy_(b)
                assert np.abs(without - want).max() > 100 * diff, entry.bits
    finally:
        rt.close()
    assert kinds == {"none", "all", "some"}  # the test's premise
    # the fast path (8-bit LoRA slots, int8 activations) at the all-2-bit configuration
    fast = Runtime.open(path, budget="3.5bits", threads=1, context_length=64)
    try:
        assert all(o.bits == LOW_BITS for o in fast.config.values())
        want = _torch_logits(model, fast.config)
        assert np.abs(_first_logits(fast, PROMPT_IDS) - want).max() < 0.05 * np.abs(want).max()
    finally:
        fast.close()


def test_a_pair_the_manifest_does_not_describe_is_a_bundle_error(trained, tmp_path) -> None:
    path, _ = trained
    for edit, message in (
        (lambda lora: lora.update({Lora.LOW_RANK: LOW_RANK + 1}), "expected float32"),
        (lambda lora: lora.pop(Lora.LOW_BITS), "needs low_bits"),
    ):
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(path, copy)
        manifest = json.loads((copy / MANIFEST).read_text())
        edit(manifest[Key.LORA])
        (copy / MANIFEST).write_text(json.dumps(manifest))
        with pytest.raises(BundleError, match=message):
            Bundle.open(copy).lora_pairs()
    # and a pair the file lacks, listed with its right hash and size
    from safetensors.numpy import load_file, save_file

    from coalora.runtime.format.reader import sha256_file

    copy = tmp_path / "short"
    shutil.copytree(path, copy)
    lora_file = copy / LORA_FILE
    tensors = load_file(lora_file)
    missing = next(k for k in tensors if k.endswith(f".{LORA_B_LOW}"))
    del tensors[missing]
    save_file(tensors, lora_file)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest[Key.FILES][LORA_FILE] = {
        FileEntry.SHA256: sha256_file(lora_file),
        FileEntry.BYTES: lora_file.stat().st_size,
    }
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=f"no tensor '{missing}'"):
        Bundle.open(copy, verify="all").lora_pairs()


def test_slim_keeps_the_pair_and_inspect_names_it(trained, tmp_path, capsys) -> None:
    from coalora.export.slim import slim_bundle
    from coalora.runtime.report import bundle_summary, print_summary

    path, _ = trained
    full = Bundle.open(path)
    slim = Bundle.open(slim_bundle(path, tmp_path / "slim", max_bits=6.0), verify="all")
    assert slim.format_version == LOW_PAIR_FORMAT_VERSION
    assert slim.lora_ranks == full.lora_ranks
    kept, shipped = slim.lora_pairs(), full.lora_pairs()
    for name in shipped.a_low:
        np.testing.assert_array_equal(kept.b_low[name], shipped.b_low[name])
    print_summary(bundle_summary(slim))
    shown = " ".join(capsys.readouterr().out.split())  # rich wraps to the terminal
    assert f"LoRA rank {RANK}, alpha 8.0 (+{LOW_RANK} at {LOW_BITS} bits)" in shown
