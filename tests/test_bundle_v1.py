"""A bundle written before the format moved into its own package still opens and serves.

``tests/fixtures/bundle-v1-llama`` was written by the format-1 writer (``export/bundle.py``
at the time) from ``bundles.build_llama_bundle(steps=2)`` with a smaller random LLaMA
(hidden 32, 2 heads of 16, 1 KV head, MLP 48, 2 layers). The figures below were read from it
then: the memory plan of every stored configuration, what each budget selects, and a seeded
sampled continuation.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from coalora.runtime.engine import Runtime
from coalora.runtime.format.reader import Bundle
from coalora.runtime.sampling import SamplingParams

FIXTURE = Path(__file__).parent / "fixtures" / "bundle-v1-llama"

# bits of each stored configuration -> its plan's total bytes at context 64, 8-bit LoRA. The
# plan has since counted the runtime's measured 120 MiB (was 64 MiB), the tokenizer as the
# runtime measured it (``plan.TOKENIZER_RSS_FACTOR``), the matrices as MatMulNBits holds them
# prepacked (``plan.prepacked_bytes``), and the fused copies held
# while building (``build_scratch_bytes``), and the tied head's 8-bit codes serve the
# embedding in place of the fp32 table (``plan.embedding_from_head``), held once: a run is fed
# its tokens' rows from the file (``runtime.table_rows``); the bundle's own figures are as
# they were.
PLANS = {4.9: 126027531, 5.5667: 126025625, 9.8667: 126038919, 6.9167: 126023089}


def test_v1_bundle_opens_and_verifies() -> None:
    bundle = Bundle.open(FIXTURE, verify="all")
    assert bundle.family == "llama"
    assert len(bundle.space.matrices) == 14
    assert sorted(o.name for o in bundle.shipped) == ["2b64", "4b32", "8b32"]


def test_v1_bundle_plans_and_selects_as_before() -> None:
    rt = Runtime.open(FIXTURE, budget="10bits", context_length=64, threads=1, build=False)
    plans = {round(e.bits, 4): rt.plan(e.config).total for e in rt.pareto.entries}
    assert plans == PLANS
    assert rt.plan(rt.pareto.entries[0].config).to_dict() == {
        "quantized_weights_bytes": 17412,
        "other_weights_bytes": 54867,
        "lora_bytes": 11776,
        "kv_cache_bytes": 16384,
        "runtime_overhead_bytes": 125920372,
        "build_scratch_bytes": 6720,
        "total": 126027531,
        "address_space_bytes": 84088844,
    }
    assert rt.selection.reason == (
        "perplexity 314.3 at 4.90 bits (seen configuration, plan 126.1 MB): best of 4/4 "
        "stored configurations within the 10 bits budget"
    )


@pytest.mark.parametrize("accuracy_level", [0, 4])
def test_v1_bundle_serves_as_before(accuracy_level: int) -> None:
    rt = Runtime.open(
        FIXTURE, budget="6bits", context_length=64, threads=1, accuracy_level=accuracy_level
    )
    sampled = rt.generate_ids([2, 5, 200, 17, 33, 100], 12, SamplingParams(temperature=0.8, seed=3))
    assert sampled == [27, 74, 253, 185, 31, 137, 154, 49, 235, 36, 122, 164]
    assert rt.generate_ids([2, 5, 200, 17, 33, 100], 12) == [100] * 12
