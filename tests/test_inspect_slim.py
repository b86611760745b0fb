"""Inspecting a bundle, plotting its Pareto set, and slimming it for a device class."""

from __future__ import annotations

from pathlib import Path

import pytest

from coalora.export.plots import plot_pareto
from coalora.export.slim import SlimError, slim_bundle
from coalora.runtime.format.pareto import ParetoSet
from coalora.runtime.format.reader import Bundle
from coalora.runtime.format.spec import Key, Slimmed
from coalora.runtime.report import bundle_summary, print_summary


def test_summary_and_plot(tiny_llama_bundle: Path, tmp_path: Path, capsys) -> None:
    summary = bundle_summary(Bundle.open(tiny_llama_bundle))
    assert summary["family"] == "llama" and len(summary["pareto"]) == 4
    bits = [e["bits"] for e in summary["pareto"]]
    assert bits == sorted(bits)
    print_summary(summary)
    assert "Pareto set: perplexity" in capsys.readouterr().out
    png = plot_pareto(summary, tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_slim_keeps_only_what_fits(tiny_llama_bundle: Path, tmp_path: Path) -> None:
    full = Bundle.open(tiny_llama_bundle)
    out = slim_bundle(tiny_llama_bundle, tmp_path / "slim", max_bits=6.0)
    slim = Bundle.open(out, verify="all")
    pareto = ParetoSet.from_dict(slim.pareto_dict(), slim.space)
    assert pareto.entries and all(e.bits <= 6.0 for e in pareto.entries)
    used: dict = {}
    for e in pareto.entries:
        for name, opt in e.config.items():
            used.setdefault(opt, set()).add(name)
    assert {o: set(n) for o, n in slim.shipped.items()} == used  # only what a config uses
    assert sum(map(len, slim.shipped.values())) < sum(map(len, full.shipped.values()))
    assert slim.size_on_disk() < full.size_on_disk()
    assert slim.manifest[Key.SLIMMED][Slimmed.MAX_BITS] == 6.0


def test_slim_below_everything_fails_cleanly(tiny_llama_bundle: Path, tmp_path: Path) -> None:
    with pytest.raises(SlimError, match="smallest needs"):
        slim_bundle(tiny_llama_bundle, tmp_path / "none", max_bits=1.0)
    assert not (tmp_path / "none").exists()


def test_cli_inspect_and_slim(tiny_llama_bundle: Path, tmp_path: Path) -> None:
    import json

    from typer.testing import CliRunner

    from coalora.export.cli import app

    runner = CliRunner()
    res = runner.invoke(app, ["inspect", str(tiny_llama_bundle), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["family"] == "llama"
    res = runner.invoke(app, ["inspect", str(tiny_llama_bundle), "--plot", str(tmp_path / "p.png")])
    assert res.exit_code == 0 and (tmp_path / "p.png").exists()
    out = tmp_path / "slim"
    res = runner.invoke(
        app, ["export", "slim", str(tiny_llama_bundle), "--max-bits", "6", "--out", str(out)]
    )
    assert res.exit_code == 0, res.output
    assert Bundle.open(out, verify="all").manifest[Key.SLIMMED][Slimmed.MAX_BITS] == 6.0
    res = runner.invoke(app, ["inspect", str(tmp_path / "missing")])
    assert res.exit_code == 2 and res.stderr.count("\n") == 1 and "no bundle" in res.stderr
    res = runner.invoke(  # the command's old name, an alias for one release
        app, ["export", "bundle", str(tiny_llama_bundle), "--max-bits", "1", "--out", str(out)]
    )
    assert res.exit_code == 2 and "smallest needs" in res.stderr
