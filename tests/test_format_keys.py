"""The bundle format's keys are spelled once, in ``coalora.runtime.format.spec``.

Outside the format package no module may index a manifest (or a section of it) with a string
literal: ``manifest["lora"]``, ``bundle.manifest.get("training")``,
``manifest[Key.ARCHITECTURE]["labels"]`` and ``bundle.architecture.get("lm_head")`` all fail
here. A key goes into ``spec`` as a named constant instead.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("runtime", "kernels", "export", "benchmarks", "scripts", "tests")
FORMAT_PACKAGE = ROOT / "runtime" / "format"
# Names that hold the manifest or one of its sections.
MANIFEST_NAMES = frozenset({"manifest", "bundle_manifest", "architecture"})


def _rooted_in_manifest(node: ast.expr) -> bool:
    """Whether ``node`` is a manifest or is reached from one by indexing or ``.get``."""
    while True:
        if isinstance(node, ast.Name):
            return node.id in MANIFEST_NAMES
        if isinstance(node, ast.Attribute):
            if node.attr in MANIFEST_NAMES:
                return True
            node = node.value
        elif isinstance(node, ast.Subscript):
            node = node.value
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if node.func.attr != "get":
                return False
            node = node.func.value
        else:
            return False


def _is_str(node: ast.expr) -> bool:
    return isinstance(node, ast.Constant) and isinstance(node.value, str)


def literal_manifest_keys(source: str, filename: str = "<src>") -> list[tuple[int, str]]:
    """(line, key) of every string literal used as a key into a manifest in ``source``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Subscript) and _is_str(node.slice):
            if _rooted_in_manifest(node.value):
                found.append((node.lineno, node.slice.value))
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "setdefault", "pop")
            and node.args
            and _is_str(node.args[0])
            and _rooted_in_manifest(node.func.value)
        ):
            found.append((node.lineno, node.args[0].value))
    return found


def test_the_checker_finds_literal_keys() -> None:
    src = (
        "a = manifest['lora']\n"
        "b = bundle.manifest.get('training')\n"
        "c = manifest[Key.ARCHITECTURE]['labels']\n"
        "d = bundle.architecture.get('lm_head')\n"
        "e = self.bundle.manifest[Key.THETA].get('vocab')\n"
        "manifest['format_version'] = 99\n"
        "ok = manifest[Key.LORA][Lora.RANK]\n"
        "ok2 = other['lora']\n"
    )
    keys = [k for _, k in literal_manifest_keys(src)]
    assert keys == ["lora", "training", "labels", "lm_head", "vocab", "format_version"]


def test_no_module_outside_the_format_package_indexes_a_manifest_with_a_literal() -> None:
    offenders = []
    for folder in SCANNED:
        for path in sorted((ROOT / folder).rglob("*.py")):
            if FORMAT_PACKAGE in path.parents:
                continue
            for line, key in sorted(literal_manifest_keys(path.read_text("utf-8"), str(path))):
                offenders.append(f"{path.relative_to(ROOT)}:{line}: {key!r}")
    assert not offenders, "use the constants of coalora.runtime.format.spec:\n" + "\n".join(
        offenders
    )
