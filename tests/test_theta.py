"""θ (the configuration-aware network) and its input vocabulary."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch

from coalora.export.coa_lora.theta import ConfigTheta, ThetaVocab
from coalora.export.models import config_space, tiny_llama
from coalora.kernels import Configuration, QuantOption

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_config(space, seed: int = 0) -> Configuration:
    rng = np.random.default_rng(seed)
    return Configuration(
        {m.name: space.options[rng.integers(len(space.options))] for m in space.matrices}
    )


@pytest.fixture(scope="module")
def space():
    return config_space(tiny_llama())


@pytest.fixture(scope="module")
def vocab(space):
    return ThetaVocab.from_space(space)


def _inputs(arrays, use_global=True):
    ints = [torch.as_tensor(arrays[k]) for k in ("bits", "block", "layer", "module")]
    return (*ints, torch.as_tensor(arrays["global"]) if use_global else None)


def test_vocab_covers_space(space, vocab):
    assert vocab.bits == (2, 4, 8)
    assert vocab.block_sizes == (32, 64, 128)
    assert vocab.module_types == ("q", "k", "v", "o", "gate", "up", "down")
    assert vocab.n_layers == 2


def test_output_shape_and_zero_init(space, vocab):
    theta = ConfigTheta(vocab, rank=8)
    U = theta(*_inputs(vocab.encode(_random_config(space), space)))
    assert U.shape == (len(space), 8, 8)
    assert float(U.detach().abs().max()) < 0.05  # U ~ 0: training starts from plain LoRA


def test_global_feature_switch_changes_input_width(vocab):
    on = ConfigTheta(vocab, rank=4, embed_dim=8, use_global_feature=True)
    off = ConfigTheta(vocab, rank=4, embed_dim=8, use_global_feature=False)
    assert on.in_dim == 40 and off.in_dim == 32
    assert on.fc1.in_features == 40 and off.fc1.in_features == 32
    assert off.global_proj is None


def test_global_feature_reaches_output(space, vocab):
    theta = ConfigTheta(vocab, rank=4, init_std=0.5)
    arrays = vocab.encode(space.uniform(QuantOption(4, 64)), space)
    ints = _inputs(arrays)[:4]
    a = theta(*ints, torch.tensor([-1.0]))
    b = theta(*ints, torch.tensor([1.0]))
    assert not torch.allclose(a, b)
    # A per-matrix global feature [n] broadcasts the same way as a scalar [1].
    c = theta(*ints, torch.full((len(space),), -1.0))
    torch.testing.assert_close(a, c)


def test_encode_decode_round_trip(space, vocab):
    config = _random_config(space, seed=3)
    arrays = vocab.encode(config, space)
    assert {k: v.dtype for k, v in arrays.items()} == {
        "bits": np.int64,
        "block": np.int64,
        "layer": np.int64,
        "module": np.int64,
        "global": np.float32,
    }
    decoded = vocab.decode(arrays)
    assert [d[0] for d in decoded] == [config[m.name] for m in space.matrices]
    assert decoded[0][1:] == (0, "q")
    assert decoded[-1][1:] == (1, "down")
    lo = vocab.encode(space.cheapest(), space)["global"][0]
    mid = vocab.global_feature(0.5 * (space.min_bits() + space.max_bits()))
    assert lo == pytest.approx(-1.0) and mid == pytest.approx(0.0)
    assert vocab.global_feature(space.max_bits()) == pytest.approx(1.0)


def test_vocab_dict_round_trip(vocab):
    assert ThetaVocab.from_dict(json.loads(json.dumps(vocab.to_dict()))) == vocab
    with pytest.raises(ValueError, match="malformed"):
        ThetaVocab.from_dict({"bits": [2]})


def test_unknown_option_is_refused(space):
    small = ThetaVocab.from_space(
        type(space)(space.matrices, [QuantOption(4, 32), QuantOption(4, 64)])
    )
    with pytest.raises(ValueError, match="bit-width 2"):
        small.encode(space.uniform(QuantOption(2, 32)), space)


def test_any_depth_works():
    space = config_space(tiny_llama(num_hidden_layers=40))
    vocab = ThetaVocab.from_space(space)
    assert vocab.n_layers == 40
    arrays = vocab.encode(_random_config(space), space)
    assert arrays["layer"].max() == 39
    U = ConfigTheta(vocab, rank=4)(*_inputs(arrays))
    assert U.shape == (40 * 7, 4, 4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_onnx_export_matches_torch(space, vocab):
    ort = pytest.importorskip("onnxruntime")
    theta = ConfigTheta(vocab, rank=4, init_std=0.5).eval()
    arrays = vocab.encode(_random_config(space), space)
    names = ["bits", "block", "layer", "module", "global"]
    buf = io.BytesIO()
    torch.onnx.export(
        theta,
        _inputs(arrays),
        buf,
        input_names=names,
        output_names=["U"],
        dynamic_axes={k: {0: "n"} for k in names[:4]},
        dynamo=False,
    )
    sess = ort.InferenceSession(buf.getvalue(), providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: arrays[k] for k in names})[0]
    with torch.no_grad():
        want = theta(*_inputs(arrays)).numpy()
    np.testing.assert_allclose(got, want, atol=1e-5)
