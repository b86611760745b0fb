"""Budget parsing: the forms a user writes, the ones refused, and properties over many inputs."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coalora.runtime.budget import Budget, BudgetError, format_bytes, parse_budget


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("3.5bits", "bits", 3.5),
        ("3.5 bits", "bits", 3.5),
        ("4bit", "bits", 4.0),
        (" 2.25 BITS ", "bits", 2.25),
        ("32bits", "bits", 32.0),
        ("600MB", "bytes", 600 * 10**6),
        ("1.5GB", "bytes", 1_500_000_000),
        ("512MiB", "bytes", 512 * 2**20),
        ("2GiB", "bytes", 2 * 2**30),
        ("1500000000B", "bytes", 1_500_000_000),
        ("600 mb", "bytes", 600 * 10**6),
        ("64KiB", "bytes", 64 * 1024),
        ("auto", "auto", None),
        ("AUTO", "auto", None),
    ],
)
def test_accepts(text: str, kind: str, value: float | None) -> None:
    budget = parse_budget(text)
    assert budget.kind == kind
    assert budget.value == value
    if kind == "bytes":
        assert isinstance(budget.value, int)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("3.5", "no unit"),
        ("bits", "no number"),
        ("-1GB", "positive"),
        ("0bits", "positive"),
        ("1e400bits", "finite"),
        ("nan bits", "finite"),
        ("inf GB", "finite"),
        ("", "empty"),
        ("   ", "empty"),
        ("33bits", "32"),
        ("4b", "ambiguous"),
        ("abcMB", "not a number"),
        ("0.1B", "less than one byte"),
        ("1e300TB", "implausibly large"),
    ],
)
def test_rejects_with_one_clear_message(text: str, says: str) -> None:
    with pytest.raises(BudgetError, match=says) as info:
        parse_budget(text)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, ValueError)


def test_unit_is_kept_for_messages_but_not_for_equality() -> None:
    assert parse_budget("1GB") == parse_budget("1000MB")
    assert parse_budget("2GiB").unit == "GiB"
    assert str(parse_budget("512MiB")) == "512 MiB"
    assert str(parse_budget("3.5bits")) == "3.5 bits"
    assert str(parse_budget("auto")) == "auto"


def test_budget_is_validated_when_built_directly() -> None:
    with pytest.raises(BudgetError):
        Budget("bits", math.nan)
    with pytest.raises(BudgetError):
        Budget("bytes", 0)
    with pytest.raises(BudgetError):
        Budget("bytes", 1.5)  # type: ignore[arg-type]
    with pytest.raises(BudgetError):
        Budget("watts", 3)  # type: ignore[arg-type]


def test_format_bytes_rounds_up_when_asked() -> None:
    assert format_bytes(412_300_000) == "412.3 MB"
    assert format_bytes(412_300_001, round_up=True) == "412.4 MB"
    assert format_bytes(412_300_000, round_up=True) == "412.3 MB"
    assert format_bytes(3 * 2**30, "GiB") == "3 GiB"
    assert format_bytes(165_100_001, "GB", round_up=True) == "0.166 GB"
    assert format_bytes(1_500_000_000, "GB") == "1.5 GB"
    assert format_bytes(1234, "B") == "1234 B"


_BYTE_UNITS = {"B": 1, "MB": 10**6, "GB": 10**9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


@settings(max_examples=200, deadline=None)
@given(
    value=st.floats(min_value=1e-3, max_value=32.0, allow_nan=False, allow_infinity=False),
    space=st.sampled_from(["", " "]),
    unit=st.sampled_from(["bits", "bit", "Bits"]),
)
def test_bits_round_trip(value: float, space: str, unit: str) -> None:
    budget = parse_budget(f"{value!r}{space}{unit}")
    assert budget.kind == "bits"
    assert budget.value == pytest.approx(value, rel=1e-12)


@settings(max_examples=200, deadline=None)
@given(
    value=st.floats(min_value=1.0, max_value=1e6, allow_nan=False, allow_infinity=False),
    unit=st.sampled_from(sorted(_BYTE_UNITS)),
    space=st.sampled_from(["", " "]),
)
def test_bytes_round_trip(value: float, unit: str, space: str) -> None:
    budget = parse_budget(f"{value:.6g}{space}{unit}")
    assert budget.kind == "bytes"
    expected = float(f"{value:.6g}") * _BYTE_UNITS[unit]
    assert budget.value == pytest.approx(expected, rel=1e-9, abs=1)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=30))
def test_garbage_raises_only_budget_error(text: str) -> None:
    try:
        budget = parse_budget(text)
    except BudgetError:
        return
    assert budget.kind in ("bits", "bytes", "auto")


@settings(max_examples=150, deadline=None)
@given(st.from_regex(r"\A[ +\-0-9.eE_naif]{0,12}\s?(bits?|[kmgtKMGT]i?[bB]|B|b|auto)?\Z"))
def test_near_miss_inputs_raise_only_budget_error(text: str) -> None:
    try:
        budget = parse_budget(text)
    except BudgetError:
        return
    if budget.kind == "bits":
        assert 0 < budget.value <= 32
    elif budget.kind == "bytes":
        assert isinstance(budget.value, int) and budget.value > 0
