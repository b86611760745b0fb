"""Where and how the export computes changes nothing in the bundle: --device, layer-at-a-time
quantization (codes kept, fp weights dropped), the bf16 base; and the errors of a device or a
backend that is not there."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from test_pipeline import _opts, inputs  # noqa: F401  (the tiny model and data fixture)
from typer.testing import CliRunner

from coalora.export.cli import app
from coalora.export.coa_lora import CoALoRAConfig, CoALoRAModel, train_step
from coalora.export.coa_lora.train import make_optimizer
from coalora.export.data import TextDataset, lm_batches
from coalora.export.memory import cache_bytes, use_layerwise
from coalora.export.models import config_space, tiny_llama, tiny_tokenizer
from coalora.export.pipeline import run_export
from coalora.runtime.format.pareto import ParetoSet
from coalora.runtime.format.reader import Bundle
from coalora.runtime.format.spec import MANIFEST, Key, Training

pytestmark = pytest.mark.usefixtures("one_torch_thread")
FAST = dict(steps=3, steps_per_epoch=0, sweep_step=2.0, sweep_random=1, quantizer="search")


def _manifest(bundle) -> dict:
    """The manifest but for what a run's clock writes."""
    m = json.loads((bundle / MANIFEST).read_text())
    m[Key.TRAINING].pop(Training.SECONDS)
    return m


def _pareto(bundle) -> ParetoSet:
    b = Bundle.open(bundle, verify="all")
    return ParetoSet.from_dict(b.pareto_dict(), b.space)


def _structure(p: ParetoSet) -> tuple:
    return (p.metric_name, p.higher_is_better, len(p), [len(e.config) for e in p.entries])


def test_device_and_layerwise_leave_the_bundle_as_it_was(inputs, tmp_path):  # noqa: F811
    plain = run_export(_opts(inputs, tmp_path / "a", device="cpu", layerwise="off", **FAST))
    # auto picks the CPU here; layer-at-a-time keeps codes only and rebuilds each step's options
    other = run_export(_opts(inputs, tmp_path / "b", device="auto", layerwise="on", **FAST))
    assert _manifest(plain.bundle) == _manifest(other.bundle)  # file hashes included
    assert _structure(_pareto(plain.bundle)) == _structure(_pareto(other.bundle))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_a_gpu_trained_bundle_opens_as_a_cpu_trained_one(inputs, tmp_path):  # noqa: F811
    cpu = run_export(_opts(inputs, tmp_path / "cpu", device="cpu", **FAST))
    gpu = run_export(_opts(inputs, tmp_path / "gpu", device="cuda", **FAST))
    a, b = _manifest(cpu.bundle), _manifest(gpu.bundle)
    assert a.keys() == b.keys() and a[Key.TRAINING].keys() == b[Key.TRAINING].keys()
    assert _structure(_pareto(cpu.bundle)) == _structure(_pareto(gpu.bundle))


def test_layerwise_bf16_keeps_only_codes_and_the_step_options() -> None:
    base = tiny_llama().to(torch.bfloat16)
    space = config_space(base)
    model = CoALoRAModel(base, space, CoALoRAConfig(rank=4, alpha=8, configs_per_step=2))
    all_options = cache_bytes(model)
    assert all_options == sum(m.n_params for m in space.matrices) * 2 * len(space.options)
    model.quantize_layers(layerwise=True, progress=False)
    layer = next(iter(model.layers.values()))
    assert layer.weight is None and not layer.cached_options
    configs = [space.uniform(space.options[0]), space.uniform(space.options[-1])]
    model.retain(configs)
    batches = lm_batches(TextDataset(["the cat sat on the mat " * 20]), tiny_tokenizer(), 32, 2)
    losses = train_step(model, make_optimizer(model), batches(0), configs)
    assert all(torch.isfinite(torch.tensor(losses)))
    # the step dequantized the two options it used (in bf16), nothing else
    assert set(layer.cached_options) == {space.options[0], space.options[-1]}
    assert layer.quantized_weight(space.options[0]).dtype == torch.bfloat16
    with pytest.raises(RuntimeError, match="--layerwise off"):
        model.set_mode("fp")
        model(**batches(0))
    assert use_layerwise("auto", model, torch.device("cpu")) is False  # tiny: it fits


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA device")
def test_cuda_without_a_gpu_is_one_error_line(inputs, tmp_path):  # noqa: F811
    args = ["export", "train", str(inputs["model"]), "--out", str(tmp_path / "b")]
    args += ["--data", str(inputs["data"]), "--device", "cuda", "-q"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert res.output.strip().startswith("error:") and "no CUDA device" in res.output
    assert not (tmp_path / "b").exists()


@pytest.mark.skipif(importlib.util.find_spec("ray") is not None, reason="ray is installed")
def test_ray_without_the_extra_is_one_error_line(inputs, tmp_path):  # noqa: F811
    args = ["export", "train", str(inputs["model"]), "--out", str(tmp_path / "b")]
    args += ["--data", str(inputs["data"]), "--ray", "local", "-q"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "coalora[ray]" in res.output and len(res.output.strip().splitlines()) == 1
