"""Every command and flag README.md shows exists in that command's --help, and the README's
first screen holds the two commands a newcomer runs."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from coalora.export.cli import app as coalora_app
from coalora.runtime.cli import app as run_app

README = Path(__file__).resolve().parents[1] / "README.md"
SUBCOMMANDS = {"export train", "export slim", "inspect", "quantize-report", "serve", "eval"}


def _readme_commands() -> list[list[str]]:
    text = README.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if line.startswith(("coalora ", "coalora-run ")):
                commands.append(shlex.split(line))
    return commands


def _prose_flags() -> list[str]:
    """Flags named in running text, e.g. `--system`."""
    return sorted(set(re.findall(r"`(--[a-z-]+)`", README.read_text(encoding="utf-8"))))


def _help(app: typer.Typer, path: list[str]) -> str:
    res = CliRunner().invoke(app, [*path, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert res.exit_code == 0, res.output
    return res.output


def _split(argv: list[str]) -> tuple[typer.Typer, list[str], list[str]]:
    prog, rest = argv[0], argv[1:]
    if prog == "coalora-run":
        return run_app, [], [a for a in rest if a.startswith("--")]
    for sub in sorted(SUBCOMMANDS, key=len, reverse=True):
        words = sub.split()
        if rest[: len(words)] == words:
            return coalora_app, words, [a for a in rest[len(words) :] if a.startswith("--")]
    raise AssertionError(f"README shows an unknown command: {' '.join(argv)}")


def test_readme_shows_commands() -> None:
    commands = _readme_commands()
    assert len(commands) >= 12
    assert {" ".join(_split(c)[1]) for c in commands} >= SUBCOMMANDS


@pytest.mark.parametrize("argv", _readme_commands(), ids=lambda a: " ".join(a)[:60])
def test_readme_command_exists(argv: list[str]) -> None:
    app, path, flags = _split(argv)
    text = _help(app, path)
    for flag in flags:
        name = flag.split("=")[0]
        assert re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text), (
            f"{' '.join(argv[:1] + path)} --help does not mention {name}"
        )


@pytest.mark.parametrize("flag", _prose_flags())
def test_readme_prose_flag_exists(flag: str) -> None:
    helps = [_help(run_app, [])] + [_help(coalora_app, s.split()) for s in SUBCOMMANDS]
    assert any(re.search(rf"(?<![\w-]){re.escape(flag)}(?![\w-])", h) for h in helps), flag


def test_first_screen_has_the_two_commands() -> None:
    first = "\n".join(README.read_text(encoding="utf-8").splitlines()[:25])
    assert "make demo" in first and "make test" in first
    makefile = (README.parent / "Makefile").read_text(encoding="utf-8")
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test$", ci, re.M)
