"""The configuration space: accounting, validation, JSON."""

from __future__ import annotations

import json

import pytest

from coalora.kernels import ConfigError, ConfigSpace, Configuration, MatrixSpec, QuantOption


@pytest.fixture
def space() -> ConfigSpace:
    return ConfigSpace([MatrixSpec("a", 64, 128), MatrixSpec("b", 256, 256)])


def test_bits_and_bytes_count_what_the_device_holds(space: ConfigSpace) -> None:
    opt = QuantOption(4, 64)
    cfg = space.uniform(opt)
    assert space.nbytes(cfg) == opt.nbytes(64, 128) + opt.nbytes(256, 256)
    assert space.bits(cfg) == pytest.approx(opt.nominal_bits())
    mixed = Configuration({"a": QuantOption(2, 128), "b": QuantOption(8, 32)})
    expected = 8 * (QuantOption(2, 128).nbytes(64, 128) + QuantOption(8, 32).nbytes(256, 256))
    assert space.bits(mixed) == pytest.approx(expected / space.total_params)
    assert space.min_bits() < space.bits(mixed) < space.max_bits()


def test_json_round_trip(space: ConfigSpace) -> None:
    cfg = Configuration({"a": QuantOption(2, 32), "b": QuantOption(8, 128)})
    text = json.dumps(cfg.to_dict())
    assert space.config_from_json(text) == cfg
    assert hash(space.config_from_json(text)) == hash(cfg)
    again = ConfigSpace.from_dict(json.loads(json.dumps(space.to_dict())))
    assert again.matrices == space.matrices and again.options == space.options


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"options": {"a": "4b32"}}, "missing matrix 'b'"),
        ({"options": {"a": "4b32", "b": "4b32", "c": "4b32"}}, "unknown matrix 'c'"),
        ({"options": {"a": "3b32", "b": "4b32"}}, "unsupported bit-width 3"),
        ({"options": {"a": "4b256", "b": "4b32"}}, "not offered"),
        ({"options": {"a": "lots", "b": "4b32"}}, "matrix 'a'"),
        ({"opts": {}}, "'options' object"),
    ],
)
def test_validation_names_the_problem(space: ConfigSpace, payload: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        space.config_from_dict(payload)


def test_bad_json_and_shapes(space: ConfigSpace) -> None:
    with pytest.raises(ConfigError, match="not valid JSON"):
        space.config_from_json("{")
    with pytest.raises(ConfigError, match="shape"):
        space.check_shapes({"a": (64, 128), "b": (64, 128)})
    with pytest.raises(ConfigError, match="no matrix 'b'"):
        space.check_shapes({"a": (64, 128)})
    with pytest.raises(ConfigError, match="invalid shape"):
        ConfigSpace.from_dict({"matrices": [{"name": "x", "shape": [0, 4]}], "options": ["4b32"]})
