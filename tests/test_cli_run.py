"""``coalora-run``: dry runs, generation, classification, and one clear line per bad input."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from coalora.runtime.cli import main
from coalora.runtime.format.spec import Key


def run_cli(
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    stdin: bytes | None = None,
) -> tuple[int, str, str]:
    if stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(stdin), encoding="utf-8"))
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out, err = capsys.readouterr()
    return int(exc.value.code or 0), out, err


@pytest.fixture(scope="module")
def damaged(tiny_llama_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("damaged")
    corrupt = Path(shutil.copytree(tiny_llama_bundle, root / "corrupt"))
    data = bytearray((corrupt / "base.safetensors").read_bytes())
    data[-1] ^= 0xFF  # same size, different hash
    (corrupt / "base.safetensors").write_bytes(bytes(data))
    version = Path(shutil.copytree(tiny_llama_bundle, root / "version"))
    manifest = json.loads((version / "manifest.json").read_text())
    manifest[Key.FORMAT_VERSION] = 99
    (version / "manifest.json").write_text(json.dumps(manifest))
    return {"corrupt": corrupt, "version": version, "missing": root / "nowhere"}


def test_dry_run_table_and_json(tiny_llama_bundle: Path, capsys, monkeypatch) -> None:
    code, out, err = run_cli(
        [str(tiny_llama_bundle), "--budget", "6bits", "--dry-run"], capsys, monkeypatch
    )
    assert code == 0 and out == ""
    assert "memory plan" in err and "configuration: 5.16 bits" in err and "total" in err
    code, out, err = run_cli(
        [str(tiny_llama_bundle), "--budget", "600MB", "--dry-run", "--json"], capsys, monkeypatch
    )
    assert code == 0 and err == ""
    d = json.loads(out)
    assert d["task"] == "causal-lm" and d["plan"]["total"] <= 600 * 10**6
    assert sum(d["options"].values()) > 0 and d["budget"] == "600 MB"


def test_generation_at_two_budgets(tiny_llama_bundle: Path, capsys, monkeypatch) -> None:
    seen = set()
    for budget in ("4bits", "6bits"):
        code, out, err = run_cli(
            [
                str(tiny_llama_bundle),
                "--budget",
                budget,
                "--prompt",
                "the news",
                "--max-tokens",
                "6",
                "--threads",
                "1",
            ],
            capsys,
            monkeypatch,
        )
        assert code == 0, err
        assert out.endswith("\n")
        lines = err.splitlines()
        assert lines[0].startswith("configuration: ") and "tok/s" in lines[-1]
        assert any(line.startswith("adapter: θ") for line in lines)
        seen.add(lines[0].split(" bits")[0])
    assert len(seen) == 2


def test_stdin_prompt_quiet_and_json(tiny_llama_bundle: Path, capsys, monkeypatch) -> None:
    args = [str(tiny_llama_bundle), "--budget", "6bits", "--max-tokens", "4", "--threads", "1"]
    code, out, err = run_cli([*args, "--quiet"], capsys, monkeypatch, stdin="the news é".encode())
    assert code == 0 and err == ""
    code, out, err = run_cli(
        [*args, "--json", "--prompt", "the news", "--temperature", "0.8", "--seed", "1"],
        capsys,
        monkeypatch,
    )
    d = json.loads(out)
    assert code == 0 and isinstance(d["answer"], str) and d["stats"]["prompt_tokens"] > 0
    code, out, err = run_cli(
        [*args, "--exact", "--json", "--prompt", "the news"], capsys, monkeypatch
    )
    assert code == 0, err
    assert isinstance(json.loads(out)["answer"], str)


def test_classify(tiny_bert_bundle: Path, capsys, monkeypatch) -> None:
    code, out, err = run_cli(
        [str(tiny_bert_bundle), "--classify", "the bank vote", "--json"], capsys, monkeypatch
    )
    d = json.loads(out)
    assert code == 0 and d["label"] in ("sport", "business", "tech")
    assert sum(d["probs"].values()) == pytest.approx(1.0)


BAD = {
    "no unit": (["--budget", "3.5", "--prompt", "hi"], "has no unit"),
    "no number": (["--budget", "bits", "--prompt", "hi"], "no number"),
    "negative": (["--budget", "-1GB", "--prompt", "hi"], "positive"),
    "overflow": (["--budget", "1e400bits", "--prompt", "hi"], "finite"),
    "below smallest": (["--budget", "1bits", "--prompt", "hi"], "needs 3.34 bits"),
    "too few bytes": (["--budget", "10MB", "--prompt", "hi"], "smallest stored configuration"),
    "unknown profile": (["--profile", "toaster", "--prompt", "hi"], "known profiles: "),
    "empty prompt": (["--prompt", "  "], "empty prompt"),
    "too long": (["--prompt", "the news " * 300], "context holds"),
    "bad int": (["--max-tokens", "many", "--prompt", "hi"], "--max-tokens"),
    "wrong task": (["--classify", "hi"], "causal-lm"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_one_line(case: str, tiny_llama_bundle: Path, capsys, monkeypatch) -> None:
    args, message = BAD[case]
    code, out, err = run_cli([str(tiny_llama_bundle), *args], capsys, monkeypatch)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert "Traceback" not in err


@pytest.mark.parametrize("kind", ["corrupt", "version", "missing"])
def test_bad_bundle_is_one_line(kind: str, damaged, capsys, monkeypatch) -> None:
    code, out, err = run_cli([str(damaged[kind]), "--prompt", "hi"], capsys, monkeypatch)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("error: ")
    assert {"corrupt": "SHA-256", "version": "version 99", "missing": "no bundle"}[kind] in err


def test_invalid_utf8_on_stdin(tiny_llama_bundle: Path, capsys, monkeypatch) -> None:
    code, out, err = run_cli([str(tiny_llama_bundle)], capsys, monkeypatch, stdin=b"hi \xff\xfe")
    assert code == 2 and out == "" and err == "error: stdin is not valid UTF-8 (byte 3)\n"


def test_list_profiles_and_help(capsys, monkeypatch) -> None:
    code, out, _ = run_cli(["--list-profiles"], capsys, monkeypatch)
    assert code == 0 and "rpi4-4gb" in out
    code, out, _ = run_cli(["--help"], capsys, monkeypatch)
    assert code == 0 and "Examples" in out and "--budget" in out and "--dry-run" in out


def test_console_script_reads_stdin(tiny_llama_bundle: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "coalora.runtime.cli",
            str(tiny_llama_bundle),
            "--budget",
            "6bits",
            "--max-tokens",
            "3",
            "--threads",
            "1",
            "--quiet",
        ],
        input=b"the news",
        capture_output=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stderr == b""
