"""The random-weight bundle builder (``bundles.random_llama_bundle``) that
benchmarks/runtime_speed.py builds its SmolLM2-shaped bundle with: the device serves it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_a_random_bundle_of_tiny_shapes_is_served(tmp_path: Path) -> None:
    from bundles import CHATML, mixed_config, random_llama_bundle

    from coalora.export.models import tiny_llama, tiny_tokenizer
    from coalora.kernels import QuantOption
    from coalora.runtime.engine import Runtime
    from coalora.runtime.plan import quantized_resident_bytes

    tok = tiny_tokenizer()
    tok.chat_template = CHATML
    cfg = json.loads(tiny_llama().config.to_json_string(use_diff=False))
    lo, hi = QuantOption(2, 64), QuantOption(8, 32)

    def configs(space):
        return [mixed_config(space, (lo,), hi, 4.0), space.uniform(hi)]

    path = random_llama_bundle(tmp_path / "random", cfg, tok, (lo, hi), configs, rank=4)
    rt = Runtime.open(path, budget="10bits", threads=1, context_length=64)
    stored = sorted(e.bits for e in rt.pareto.entries)
    assert len(stored) == 2 and stored[0] <= 4.0 < stored[1]
    assert rt.selection.entry.bits == stored[1] and rt.bundle.lora_rank == 4
    assert len(rt.generate_ids([2, 70, 80], 4)) == 4
    rt.switch(budget="4bits")
    assert rt.selection.entry.bits == stored[0]
    resident = quantized_resident_bytes(rt.bundle.space, rt.config)  # prepacked
    assert rt.plan(rt.config).quantized_weights_bytes == resident
    assert resident > rt.bundle.space.nbytes(rt.config)
