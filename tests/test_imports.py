"""The device install carries no torch: runtime/ and kernels/ must never import it."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import coalora.kernels
import coalora.runtime


def _all_modules() -> list[str]:
    names = []
    for pkg in (coalora.kernels, coalora.runtime):
        names.append(pkg.__name__)
        for info in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + "."):
            names.append(info.name)
    return names


def test_runtime_and_kernels_never_load_torch_or_transformers() -> None:
    modules = _all_modules()
    assert "coalora.kernels.quantize" in modules
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"imported: {out.stdout.strip()}"


def test_serve_and_eval_commands_need_no_torch() -> None:
    """``coalora serve`` / ``coalora eval`` are device commands: with torch and transformers
    made unimportable, their --help still works and neither is imported."""
    for command, flag in (("serve", "--adapt"), ("eval", "--configs")):
        code = (
            "import sys\n"
            "sys.modules['torch'] = None\n"
            "sys.modules['transformers'] = None\n"
            "from coalora.export.cli import app\n"
            "try:\n"
            f"    app(args=[{command!r}, '--help'], prog_name='coalora')\n"
            "except SystemExit as exc:\n"
            "    assert exc.code in (0, None), exc.code\n"
        )
        out = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            text=True,
            env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"},
        )
        assert out.returncode == 0, out.stderr
        assert flag in out.stdout
