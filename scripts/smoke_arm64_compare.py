"""Compare the generated tokens of the arm64 smoke passes with the host's, token for token.

    python scripts/smoke_arm64_compare.py OUT_DIR REFERENCE LABEL...

OUT_DIR/<label>/ holds what scripts/smoke_arm64_inside.sh wrote for each machine: the CLI's
``--json`` output of each generation case (gen-*.out) and the Python API case (api-switch.out).
Prints one line per case and machine; exits 1 when any sequence differs or is missing.
Decode speeds found in the outputs are printed as emulated figures (not speed claims).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ID_KEYS = ("ids", "token_ids", "tokens", "output_ids", "new_token_ids")
TEXT_KEYS = ("answer", "text", "completion", "output", "generated")


def _find(obj: Any, keys: tuple[str, ...], want: type) -> Any:
    """First value under one of ``keys`` (depth-first) that is a ``want``."""
    if isinstance(obj, dict):
        for k in keys:
            v = obj.get(k)
            if isinstance(v, want) and (want is not list or all(isinstance(t, int) for t in v)):
                return v
        for v in obj.values():
            found = _find(v, keys, want)
            if found is not None:
                return found
    elif isinstance(obj, list):
        for v in obj:
            found = _find(v, keys, want)
            if found is not None:
                return found
    return None


def _speeds(obj: Any, prefix: str = "") -> dict[str, float]:
    out: dict[str, float] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, int | float) and "tok_s" in k:
                out[prefix + k] = float(v)
            else:
                out.update(_speeds(v, f"{prefix}{k}."))
    return out


def _json_lines(path: Path) -> Any:
    """The CLI may print one JSON document or JSON lines; take the last complete document."""
    text = path.read_text(encoding="utf-8", errors="replace").strip()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        for line in reversed(text.splitlines()):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    raise ValueError(f"no JSON in {path}")


def sequences(folder: Path) -> tuple[dict[str, Any], dict[str, float]]:
    """case name -> token ids (list) or text (str); plus the decode speeds found."""
    seqs: dict[str, Any] = {}
    speeds: dict[str, float] = {}
    for f in sorted(folder.glob("gen-*.out")):
        try:
            doc = _json_lines(f)
        except (OSError, ValueError):
            continue
        name = f.stem
        ids = _find(doc, ID_KEYS, list)
        seqs[name] = ids if ids is not None else _find(doc, TEXT_KEYS, str)
        speeds.update({f"{name}:{k}": v for k, v in _speeds(doc).items()})
    api = folder / "api-switch.out"
    if api.is_file():
        try:
            doc = _json_lines(api)
            for step in ("open", "switch", "switch-back"):
                if isinstance(doc.get(step), dict):
                    seqs[f"api-{step}"] = doc[step]["ids"]
                    speeds[f"api-{step}:wall_tok_s"] = doc[step]["wall_tok_s"]
        except (OSError, ValueError, KeyError):
            pass
    return seqs, speeds


def first_difference(a: Any, b: Any) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def logits_report(ref_dir: Path, label_dir: Path, label: str) -> None:
    """How far the API case's logits moved (informational: the tokens decide)."""
    try:
        import numpy as np
    except ImportError:
        return
    a_file, b_file = ref_dir / "api-logits.npz", label_dir / "api-logits.npz"
    if not (a_file.is_file() and b_file.is_file()):
        return
    with np.load(a_file) as a, np.load(b_file) as b:
        for step in a.files:
            if step not in b.files:
                continue
            x, y = a[step], b[step]
            n = min(len(x), len(y))
            x, y = x[:n], y[:n]
            top2 = np.sort(x, axis=-1)[:, -2:]
            margin = float((top2[:, 1] - top2[:, 0]).min())
            diff = float(np.abs(x - y).max())
            scale = float(np.abs(x).max()) or 1.0
            print(
                f"  [{label}] api-{step} logits over {n} steps: max |diff| {diff:.3g} "
                f"({diff / scale:.2%} of max |logit|); smallest top-1/top-2 margin on the "
                f"reference {margin:.3g}"
            )


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    out, ref_label, labels = Path(argv[0]), argv[1], argv[2:]
    ref, _ = sequences(out / ref_label)
    if not ref:
        print(f"no reference outputs in {out / ref_label}")
        return 1
    bad = 0
    for label in labels:
        got, speeds = sequences(out / label)
        for case, want in ref.items():
            have = got.get(case)
            kind = "tokens" if isinstance(want, list) else "chars of text"
            if have is None:
                print(f"  [{label}] {case}: MISSING (the case did not produce output)")
                bad += 1
            elif have == want:
                print(f"  [{label}] {case}: identical to {ref_label} ({len(want)} {kind})")
            else:
                i = first_difference(want, have)
                print(
                    f"  [{label}] {case}: DIFFERS from {ref_label} at position {i} of "
                    f"{len(want)} {kind}\n      {ref_label}: {want!r}\n      {label}: {have!r}"
                )
                bad += 1
        logits_report(out / ref_label, out / label, label)
        for k, v in sorted(speeds.items()):
            print(f"  [{label}] {k} = {v:.2f} (under qemu emulation: not a device speed)")
    if bad:
        print(
            f"token comparison: {bad} case(s) differ or are missing; see docs/arm64-smoke.md "
            "(why outputs can differ between x86-64 and arm64 kernels)"
        )
        return 1
    print(f"token comparison: every case identical to {ref_label} on {', '.join(labels)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
