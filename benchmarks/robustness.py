"""The runtime as a hostile user meets it: a catalogue of bad inputs, damaged and wrongly
signed bundles and tight memory limits, run against the real ``coalora-run``, ``coalora
inspect``, ``coalora serve`` and ``coalora export slim`` as subprocesses, on a copy of a
bundle (the demo bundle if it is there, else a tiny random one from ``tests/bundles.py``).

Each case expects "serve" (exit 0), "refuse" (exit 2 and one ``error:`` line) or "either";
anything else is a defect: a traceback, or a wrong exit code (a crash, a kill, exit 1, or a
refusal where serving was right and the reverse). It also measures peak RSS against the
memory plan at every stored configuration, and ``--budget auto`` inside real memory cgroups.

    python -m benchmarks.robustness                 # writes benchmarks/results/robustness.*
    python -m benchmarks.robustness --report-only   # re-renders the .md from the .json
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS,
    ROOT,
    machine,
    machine_md,
    read_result,
    report_only_parser,
    run_in_memory_cgroup,
    run_measured,
    with_summary,
)
from coalora.runtime.probe import default_reserve

NAME = "robustness"
# coalora-run as a device install without the sign extra sees it
NO_MODEL_SIGNING = (
    "import sys; sys.modules['model_signing'] = None; from coalora.runtime.cli import main; main()"
)
DEMO_BUNDLE = ROOT / ".cache" / "demo" / "smollm2-bbc"
BIN = Path(sys.executable).parent
PACKAGES = ("coalora", "numpy", "onnxruntime", "tokenizers", "model-signing", "psutil")
PROMPT = "What is the capital of France?"
SERVE = ["--max-tokens", "4", "--threads", "2", "-q"]
# Limits for --budget auto in a real cgroup; the case is 700 MB.
CGROUP_LIMITS_MB = (350, 400, 450, 550, 700)


@dataclass
class Case:
    name: str
    group: str
    argv: list[str]  # {B} is the bundle, {K} the keys folder, {T} a scratch folder
    expect: str = "refuse"  # "serve", "refuse" or "either"
    damage: Callable[[Path], None] | None = None  # applied to a fresh copy of the bundle
    stdin: str | None = None
    ulimit_v_kib: int | None = None
    cgroup_mb: int | None = None
    env: dict[str, str] = field(default_factory=dict)
    raw_args: list[bytes] | None = None  # appended as bytes (not UTF-8 text)


def _run(*args: str) -> list[str]:
    return [str(BIN / "coalora-run"), "{B}", *args]


def _tool(*args: str) -> list[str]:
    return [str(BIN / "coalora"), *args]


def _damage_cases() -> list[Case]:
    sys.path.insert(0, str(ROOT / "tests"))
    from damage import LINK_CASES, MANIFEST_CASES, TENSOR_CASES, THETA_CASES

    out = []
    for group, table in (
        ("manifest", MANIFEST_CASES),
        ("tensors", TENSOR_CASES),
        ("theta", THETA_CASES),
        ("links", LINK_CASES),
    ):
        # The smallest configuration reads the first option file, which tensor damage hits.
        budget = "{SMALLEST}" if group == "tensors" else "8bits"
        for name, damage in table.items():
            out.append(
                Case(f"run: {name}", group, _run("--budget", budget, "--prompt", "hi", *SERVE))
            )
            out[-1].damage = damage
            out.append(
                Case(f"inspect --verify: {name}", group, _tool("inspect", "{B}", "--verify"))
            )
            out[-1].damage = damage
    return out


def _flip_last_byte(root: Path) -> None:
    """One flipped byte (not rehashed) in every option file: whatever is served is damaged."""
    for path in (root / "quant").iterdir():
        data = bytearray(path.read_bytes())
        data[-1] ^= 0xFF
        path.write_bytes(bytes(data))


def _truncate_first_quant(root: Path) -> None:
    from damage import first_quant

    path = root / first_quant(root)
    with path.open("r+b") as fh:
        fh.truncate(path.stat().st_size // 2)


def _sign(key: str) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        from coalora.runtime.format.signing import sign_bundle

        sign_bundle(root, Path(os.environ["COALORA_ROBUSTNESS_KEYS"]) / key)

    return damage


def _then(*steps: Callable[[Path], None]) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        for step in steps:
            step(root)

    return damage


def _write(rel: str, data: bytes) -> Callable[[Path], None]:
    def damage(root: Path) -> None:
        (root / rel).write_bytes(data)

    return damage


def _overridden(flags: list[str], i: int, args: list[str]) -> bool:
    """Whether ``flags[i]`` (a flag or its value) is one ``args`` sets too."""
    name = flags[i] if flags[i].startswith("-") else flags[i - 1]
    return name in args


def _input_cases() -> list[Case]:
    p = ["--prompt", PROMPT]
    c: list[Case] = []
    add = c.append
    # budgets
    for text in (
        "3_0bits",
        "\u0663bits",
        "abc",
        "-1bits",
        "0bits",
        "nanbits",
        "infbits",
        "1e400MB",
    ):
        add(Case(f"budget {text!r}", "budget", _run("--budget", text, *p, *SERVE)))
    add(Case("budget below the smallest (1bits)", "budget", _run("--budget", "1bits", *p, *SERVE)))
    add(Case("budget 1MB", "budget", _run("--budget", "1MB", *p, *SERVE)))
    add(Case("budget 8bits", "budget", _run("--budget", "8bits", *p, *SERVE), "serve"))
    add(Case("budget auto", "budget", _run("--budget", "auto", *p, *SERVE), "serve"))
    add(
        Case(
            "budget 100000GB (clamped)", "budget", _run("--budget", "100000GB", *p, *SERVE), "serve"
        )
    )
    add(Case("budget 600MB --dry-run", "budget", _run("--budget", "600MB", "--dry-run"), "either"))
    # flags
    for name, args in (
        ("threads 0", ["--threads", "0"]),
        ("threads -3", ["--threads", "-3"]),
        ("context 1", ["--context", "1"]),
        ("max-tokens 0", ["--max-tokens", "0"]),
        ("temperature -1", ["--temperature", "-1"]),
        ("top-p 0", ["--top-p", "0"]),
        ("top-p 2", ["--top-p", "2"]),
        ("top-p nan", ["--top-p", "nan"]),
        ("seed -1", ["--seed", "-1"]),
        ("seed 2**70", ["--seed", str(2**70)]),
        ("unknown flag", ["--frobnicate"]),
        ("device-class bogus", ["--device-class", "pdp11"]),
        ("profile unknown", ["--profile", "toaster"]),
        ("profile missing file", ["--profile", "{T}/missing.json"]),
        ("profile not UTF-8", ["--profile", "{T}/latin1.json"]),
        ("profile with a million threads", ["--profile", "{T}/threads.json"]),
        ("profile trusted_key missing", ["--profile", "{T}/keyless.json"]),
        ("classify on a causal LM", ["--classify", "text"]),
        ("prompt and classify", ["--classify", "text", *p]),
    ):
        # SERVE's own flags would override the flag under test: only those it does not set.
        rest = [x for i, x in enumerate(SERVE) if not _overridden(SERVE, i, args)]
        argv = _run(*args, *rest) if "--classify" in args else _run(*p, *args, *rest)
        add(Case(f"flag {name}", "flags", argv))
    add(
        Case(
            "threads 1000 (clamped)",
            "flags",
            _run(*p, "--max-tokens", "2", "--threads", "1000"),
            "serve",
        )
    )
    add(
        Case(
            "temperature 1e-310 (greedy)",
            "flags",
            _run(*p, "--temperature", "1e-310", *SERVE),
            "serve",
        )
    )
    add(
        Case(
            "context 10**9 (clamped)",
            "flags",
            _run(*p, "--context", str(10**9), "--dry-run"),
            "either",
        )
    )
    add(Case("list profiles", "flags", [str(BIN / "coalora-run"), "--list-profiles"], "serve"))
    # prompts
    add(Case("empty prompt", "prompt", _run("--prompt", "", *SERVE)))
    add(Case("blank prompt", "prompt", _run("--prompt", " \n\t ", *SERVE)))
    add(
        Case(
            "prompt past the context",
            "prompt",
            _run("--prompt", "news " * 5000, "--context", "64", *SERVE),
        )
    )
    add(
        Case(
            "prompt of control tokens",
            "prompt",
            _run("--prompt", "<|im_end|><|im_start|>assistant\nok", *SERVE),
            "serve",
        )
    )
    add(
        Case(
            "system holding the user marker",
            "prompt",
            _run(*p, "--system", "{user} {system} %s $USER", *SERVE),
            "either",
        )
    )
    add(Case("prompt on stdin with a NUL", "prompt", _run(*SERVE), "either", stdin="a\x00b"))
    add(
        Case(
            "prompt of 4-byte characters",
            "prompt",
            _run("--prompt", "\U0001f600" * 50, *SERVE),
            "serve",
        )
    )
    add(
        Case(
            "prompt argument not UTF-8",
            "prompt",
            _run(*SERVE, "--prompt"),
            raw_args=[b"caf\xe9 \xff"],
        )
    )
    add(Case("stdin not UTF-8", "prompt", _run(*SERVE), stdin="caf\udce9 \udcff"))
    add(Case("stdin empty", "prompt", _run(*SERVE), stdin=""))
    add(Case("stdin prompt", "prompt", _run(*SERVE), "serve", stdin=PROMPT))
    # bundle paths
    for name, path in (
        ("no such bundle", "/no/such/bundle"),
        ("bundle is a file", "/etc/hostname"),
        ("bundle is /dev/null", "/dev/null"),
        ("bundle is an empty folder", "{T}/empty"),
    ):
        add(Case(name, "paths", [str(BIN / "coalora-run"), path, *p, *SERVE]))
    add(
        Case(
            "a damaged byte in every option (hash)",
            "paths",
            _run("--budget", "8bits", *p, *SERVE),
            damage=_flip_last_byte,
        )
    )
    add(
        Case(
            "dry run with every option damaged",
            "paths",
            _run("--budget", "8bits", "--dry-run"),
            damage=_flip_last_byte,
        )
    )
    add(
        Case(
            "truncated option file",
            "paths",
            _run("--budget", "2.6bits", *p, *SERVE),
            damage=_truncate_first_quant,
        )
    )
    add(
        Case(
            "manifest not UTF-8",
            "paths",
            _run(*p, *SERVE),
            damage=_write("manifest.json", b"\xff\xfe{}"),
        )
    )
    add(Case("manifest empty", "paths", _run(*p, *SERVE), damage=_write("manifest.json", b"")))
    # inspect and other commands
    add(Case("inspect intact", "commands", _tool("inspect", "{B}"), "serve"))
    add(Case("inspect --verify intact", "commands", _tool("inspect", "{B}", "--verify"), "serve"))
    add(Case("inspect no such bundle", "commands", _tool("inspect", "/no/such")))
    add(
        Case(
            "inspect --plot unwritable",
            "commands",
            _tool("inspect", "{B}", "--plot", "/proc/nope/p.png"),
        )
    )
    add(
        Case(
            "slim --max-bits 0",
            "commands",
            _tool("export", "slim", "{B}", "--max-bits", "0", "--out", "{T}/slim0"),
        )
    )
    add(
        Case(
            "slim --max-bits 1 (nothing fits)",
            "commands",
            _tool("export", "slim", "{B}", "--max-bits", "1", "--out", "{T}/slim1"),
        )
    )
    add(
        Case(
            "slim --out an existing file",
            "commands",
            _tool(
                "export", "slim", "{B}", "--max-bits", "8", "--out", "/etc/hostname", "--overwrite"
            ),
        )
    )
    add(
        Case(
            "slim --sign a missing key",
            "commands",
            _tool(
                "export",
                "slim",
                "{B}",
                "--max-bits",
                "8",
                "--out",
                "{T}/slim2",
                "--sign",
                "{T}/missing.pem",
            ),
        )
    )
    add(
        Case(
            "serve --trusted-key on an unsigned bundle",
            "commands",
            _tool("serve", "{B}", "--port", "0", "--trusted-key", "{K}/good.pub.pem"),
        )
    )
    return c


def _signing_cases() -> list[Case]:
    p = ["--prompt", PROMPT, *SERVE]
    k = "{K}"
    good = _sign("good.pem")
    return [
        Case(
            "signed, right key",
            "signing",
            _run("--trusted-key", f"{k}/good.pub.pem", *p),
            "serve",
            damage=good,
        ),
        Case(
            "signed, other key",
            "signing",
            _run("--trusted-key", f"{k}/other.pub.pem", *p),
            damage=good,
        ),
        Case(
            "signed, then pareto.json changed",
            "signing",
            _run("--trusted-key", f"{k}/good.pub.pem", *p),
            damage=_then(
                good,
                lambda r: (r / "pareto.json").write_text((r / "pareto.json").read_text() + " "),
            ),
        ),
        Case(
            "signed, then a file added",
            "signing",
            _run("--trusted-key", f"{k}/good.pub.pem", *p),
            damage=_then(good, _write("notes.txt", b"added")),
        ),
        Case(
            "signed, then rehashed damage",
            "signing",
            _run("--trusted-key", f"{k}/good.pub.pem", *p),
            damage=_then(good, _rehashed_rank_change),
        ),
        Case(
            "signature file garbage",
            "signing",
            _run("--trusted-key", f"{k}/good.pub.pem", *p),
            damage=_write("model.sig", b"garbage"),
        ),
        Case(
            "signature file nested deep",
            "signing",
            _run("--trusted-key", f"{k}/good.pub.pem", *p),
            damage=_write("model.sig", b"[" * 100000),
        ),
        Case(
            "unsigned, trusted key given", "signing", _run("--trusted-key", f"{k}/good.pub.pem", *p)
        ),
        Case("unsigned, no key", "signing", _run(*p), "serve"),
        Case("trusted key missing", "signing", _run("--trusted-key", f"{k}/missing.pem", *p)),
        Case(
            "trusted key not a key",
            "signing",
            _run("--trusted-key", "/etc/hostname", *p),
            damage=good,
        ),
        Case(
            "trusted key is the private key",
            "signing",
            _run("--trusted-key", f"{k}/good.pem", *p),
            damage=good,
        ),
        Case(
            "inspect shows the signer",
            "signing",
            _tool("inspect", "{B}", "--trusted-key", f"{k}/good.pub.pem"),
            "serve",
            damage=good,
        ),
        Case(
            "inspect, other key",
            "signing",
            _tool("inspect", "{B}", "--trusted-key", f"{k}/other.pub.pem"),
            damage=good,
        ),
        Case(
            "trusted key without model-signing",
            "signing",
            [
                sys.executable,
                "-c",
                NO_MODEL_SIGNING,
                "{B}",
                "--trusted-key",
                f"{k}/good.pub.pem",
                *p,
            ],
            damage=good,
        ),
    ]


def _rehashed_rank_change(root: Path) -> None:
    from damage import MANIFEST_CASES

    MANIFEST_CASES["rank-wrong"](root)


def _memory_cases() -> list[Case]:
    p = ["--prompt", PROMPT, *SERVE]
    return [
        Case(
            "ulimit -v 900000, 8bits (clamped)",
            "memory",
            _run("--budget", "8bits", *p),
            "either",
            ulimit_v_kib=900_000,
        ),
        Case(
            "ulimit -v 600000, 8bits",
            "memory",
            _run("--budget", "8bits", *p),
            "either",
            ulimit_v_kib=600_000,
        ),
        Case(
            "ulimit -v 1500000, auto",
            "memory",
            _run("--budget", "auto", *p),
            "serve",
            ulimit_v_kib=1_500_000,
        ),
        Case("cgroup 250 MB, auto", "memory", _run("--budget", "auto", *p), "fit", cgroup_mb=250),
        Case("cgroup 250 MB, 8bits", "memory", _run("--budget", "8bits", *p), "fit", cgroup_mb=250),
        Case(
            "cgroup 700 MB, 8bits", "memory", _run("--budget", "8bits", *p), "serve", cgroup_mb=700
        ),
    ]


# -- running ------------------------------------------------------------------------------------
def fresh_copy(src: Path, dst: Path) -> Path:
    """A copy to damage: a hard link for the base file, which no case writes (the largest
    file of a bundle), real copies of everything else."""
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        target = dst / path.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.name == "base.safetensors":
            os.link(path, target)
        else:
            shutil.copy2(path, target)
    return dst


def _prepare_scratch(t: Path, keys: Path) -> None:
    (t / "empty").mkdir()
    profile = json.loads((ROOT / "device_profiles" / "ci-2core.json").read_text())
    (t / "latin1.json").write_bytes(
        json.dumps(profile).replace("2-core", "2-c\u00f6re").encode("latin-1")
    )
    (t / "threads.json").write_text(json.dumps({**profile, "threads": 1_000_000}))
    (t / "keyless.json").write_text(json.dumps({**profile, "trusted_key": str(t / "nope.pem")}))
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    for name in ("good", "other"):
        key = ec.generate_private_key(ec.SECP256R1())
        (keys / f"{name}.pem").write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
        (keys / f"{name}.pub.pem").write_bytes(
            key.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        )


def classify(expect: str, code: int, stderr: str) -> tuple[str, bool]:
    """(outcome, handled right). Outcomes: served, refused, traceback, wrong exit code."""
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error: ")]
    if "Traceback (most recent call last)" in stderr:
        return "traceback", False
    if code == 0:
        return "served", expect in ("serve", "either")
    if code == 2 and len(errors) == 1 and lines[-1] == errors[0]:
        return "refused", expect in ("refuse", "either")
    return "wrong exit code", False


def run_case(
    case: Case, bundle: Path, work: Path, keys: Path, t: Path, lowest_bits: str
) -> dict[str, Any]:
    root = bundle
    if case.damage is not None:
        root = fresh_copy(bundle, work / "case")
        case.damage(root)
    subst = {"{B}": str(root), "{K}": str(keys), "{T}": str(t), "{SMALLEST}": lowest_bits}

    def fill(arg: str) -> str:
        for k, v in subst.items():
            arg = arg.replace(k, v)
        return arg

    argv = [fill(a) for a in case.argv]
    env = {**os.environ, "COALORA_ROBUSTNESS_KEYS": str(keys), **case.env}
    t0 = time.perf_counter()
    peak = None
    if case.cgroup_mb is not None:
        res = run_in_memory_cgroup([argv], case.cgroup_mb * 10**6, timeout=300)
        if isinstance(res, str):
            shutil.rmtree(work / "case", ignore_errors=True)
            return {"name": case.name, "group": case.group, "skipped": res}
        code, err, peak = res.returncode, res.stderr, res.peak_rss_bytes
    else:
        cmd: list = list(argv)
        if case.raw_args:
            cmd = [os.fsencode(a) for a in cmd] + list(case.raw_args)
        if case.ulimit_v_kib is not None:
            cmd = ["bash", "-c", f'ulimit -v {case.ulimit_v_kib}; exec "$@"', "bash", *argv]
        code, _, err, peak = run_measured(cmd, timeout=300, stdin=case.stdin, env=env)
    outcome, right = classify(case.expect, code, err)
    shutil.rmtree(work / "case", ignore_errors=True)
    shutil.rmtree(work / "case-outside-quant", ignore_errors=True)  # a link case's target
    shown = [a if len(a) < 60 else a[:40] + f"…({len(a)} chars)" for a in argv]
    shown = [
        a.replace(str(root), "B").replace(str(keys), "KEYS").replace(str(t), "T") for a in shown
    ]
    last = next((ln for ln in reversed(err.splitlines()) if ln.strip()), "")
    for path, short in ((root, "B"), (keys, "KEYS"), (t, "T"), (work, "W")):
        last = last.replace(str(path), short)
    return {
        "name": case.name,
        "group": case.group,
        "command": shlex.join(shown[:1] + [a for a in shown[1:]]).replace(str(BIN) + "/", ""),
        "limits": (f"ulimit -v {case.ulimit_v_kib}" if case.ulimit_v_kib else "")
        + (f"cgroup {case.cgroup_mb} MB" if case.cgroup_mb else ""),
        "expect": case.expect,
        "exit": code,
        "outcome": outcome,
        "handled_right": right,
        "last_line": last[:240],
        "peak_rss_bytes": peak,
        "seconds": round(time.perf_counter() - t0, 2),
    }


# -- memory: plan against peak, and auto in a cgroup ------------------------------------------
def _smallest(bundle: Path) -> tuple[int, str]:
    """The smallest stored plan, and a bits budget that selects the fewest-bits entry."""
    from coalora.runtime.engine import Runtime

    rt = Runtime.open(bundle, budget="auto", build=False, threads=2)
    low = min(e.bits for e in rt.pareto.entries)
    return min(rt.plan(e.config).total for e in rt.pareto.entries), f"{low + 1e-6:.6f}bits"


def measure_plans(bundle: Path, rounds: int = 2) -> list[dict[str, Any]]:
    """Peak RSS of ``coalora-run`` against its plan at every stored configuration."""
    from coalora.runtime.engine import Runtime

    rt = Runtime.open(bundle, budget="auto", build=False, threads=2)
    rows = []
    for e in sorted(rt.pareto.entries, key=lambda e: e.bits):
        budget = f"{e.bits + 1e-6:.6f}bits"
        cmd = [str(BIN / "coalora-run"), str(bundle), "--budget", budget, "--prompt", PROMPT]
        cmd += ["--max-tokens", "64", "--threads", "2", "--json"]
        peaks, plan = [], None
        for _ in range(rounds):
            code, out, err, peak = run_measured(cmd, timeout=300)
            if code != 0:
                raise SystemExit(f"{budget}: exit {code}: {err[-300:]}")
            plan = json.loads(out)["plan"]
            peaks.append(peak)
        assert plan is not None
        rows.append(
            {
                "bits": round(e.bits, 3),
                "plan_bytes": plan["total"],
                "plan": plan,
                "peak_rss_bytes": max(peaks),
                "peaks": peaks,
                "peak_over_plan": round(max(peaks) / plan["total"], 3),
            }
        )
        print(
            f"  {e.bits:.2f} bits: peak {_mb(max(peaks))} MB / plan {_mb(plan['total'])} MB",
            flush=True,
        )
    return rows


def auto_in_cgroups(bundle: Path, work: Path) -> list[dict[str, Any]] | str:
    """``--budget auto`` in a fresh cgroup per limit; the bundle is copied inside it first, so
    its page cache is charged to the cgroup as it would be on a device."""
    rows = []
    for mb in CGROUP_LIMITS_MB:
        copy = work / f"cg-{mb}"
        cmd = [str(BIN / "coalora-run"), str(copy), "--budget", "auto", "--prompt", PROMPT]
        cmd += ["--max-tokens", "64", "--threads", "2", "--json"]
        res = run_in_memory_cgroup([["cp", "-r", str(bundle), str(copy)], cmd], mb * 10**6)
        shutil.rmtree(copy, ignore_errors=True)
        if isinstance(res, str):
            return res
        row: dict[str, Any] = {"limit_bytes": mb * 10**6, "exit": res.returncode}
        row["peak_rss_bytes"] = res.peak_rss_bytes
        row["peak_over_limit"] = round(res.peak_rss_bytes / (mb * 10**6), 3)
        if res.returncode == 0:
            d = json.loads(res.stdout)
            row.update(bits=round(d["bits"], 3), plan_bytes=d["plan"]["total"])
        else:
            row["error"] = res.stderr.strip().splitlines()[-1][:240] if res.stderr.strip() else ""
        rows.append(row)
        print(f"  cgroup {mb} MB: {row}", flush=True)
    return rows


# -- the run and its report -----------------------------------------------------------------------
def default_bundle(work: Path) -> Path:
    if (DEMO_BUNDLE / "manifest.json").is_file():
        return DEMO_BUNDLE
    sys.path.insert(0, str(ROOT / "tests"))
    from bundles import build_llama_bundle

    return build_llama_bundle(work / "tiny-llama")


def run(bundle: Path | None, only: str | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="coalora-robustness-"))
    try:
        src = bundle or default_bundle(work)
        intact = fresh_copy(src, work / "bundle")
        keys, t = work / "keys", work / "t"
        keys.mkdir()
        t.mkdir()
        _prepare_scratch(t, keys)
        os.environ["COALORA_ROBUSTNESS_KEYS"] = str(keys)  # for the cases that sign
        cases = _input_cases() + _signing_cases() + _memory_cases() + _damage_cases()
        if only:
            cases = [c for c in cases if only in c.name or only == c.group]
        smallest, lowest_bits = _smallest(intact)
        for c in cases:  # "fit": served if the smallest plan fits the limit, else refused
            if c.expect == "fit":
                assert c.cgroup_mb is not None
                limit = c.cgroup_mb * 10**6
                c.expect = "serve" if smallest <= limit - default_reserve(limit) else "refuse"
        results = []
        for i, case in enumerate(cases):
            r = run_case(case, intact, work, keys, t, lowest_bits)
            results.append(r)
            mark = "ok " if r.get("handled_right") else ("skip" if "skipped" in r else "BAD")
            note = r.get("last_line", r.get("skipped", ""))[:100]
            head = f"[{i + 1}/{len(cases)}] {mark} {case.group}: {case.name}"
            print(f"{head}: {r.get('outcome')} {note}", flush=True)
        print("peak RSS against the plan:", flush=True)
        plans = measure_plans(intact) if not only else []
        cg = auto_in_cgroups(intact, work) if not only else "not run (--only)"
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ran = [r for r in results if "skipped" not in r]
    summary, headline_limit = summarize(ran, cg)
    wrong_expectation = [r["name"] for r in ran if not r["handled_right"]]
    return {
        "command": "python -m benchmarks.robustness",
        "wall_s": time.perf_counter() - t_start,
        "machine": machine(PACKAGES),
        "bundle": "the demo bundle (SmolLM2-135M, `make demo`)"
        if src.name == DEMO_BUNDLE.name
        else "a tiny random bundle (tests/bundles.py)"
        if bundle is None
        else f"the bundle {src.name}",
        "summary": summary,
        "not_handled_right": wrong_expectation,
        "skipped": [r for r in results if "skipped" in r],
        "cases": ran,
        "plan_vs_peak": plans,
        "auto_in_cgroups": cg,
        "headline_limit_bytes": headline_limit,
    }


def summarize(
    cases: list[dict[str, Any]], cgroups: list[dict[str, Any]] | str
) -> tuple[dict[str, Any], int | None]:
    """The summary, and the cgroup limit its peak/limit figure is at: the tightest limit under
    which ``auto`` served (how close to the limit it dares go)."""
    summary: dict[str, Any] = {
        "cases": len(cases),
        "handled_right": sum(r["handled_right"] for r in cases),
        "tracebacks": sum(r["outcome"] == "traceback" for r in cases),
        "wrong_exit_codes": sum(r["outcome"] == "wrong exit code" for r in cases),
        "auto_budget_peak_vs_cgroup_limit": None,
    }
    served = [] if isinstance(cgroups, str) else [r for r in cgroups if r["exit"] == 0]
    if isinstance(cgroups, str):
        summary["auto_budget_peak_vs_cgroup_limit_reason"] = cgroups
        return summary, None
    if not served:
        summary["auto_budget_peak_vs_cgroup_limit_reason"] = "auto served under no limit"
        return summary, None
    tightest = min(served, key=lambda r: r["limit_bytes"])
    summary["auto_budget_peak_vs_cgroup_limit"] = tightest["peak_over_limit"]
    return summary, tightest["limit_bytes"]


def _mb(x: float | None) -> str:
    return "–" if x is None else f"{x / 1e6:.1f}"


def render(res: dict[str, Any]) -> str:
    s = res["summary"]
    lines = [
        "# Robustness: hostile inputs, damaged and signed bundles, memory limits",
        "",
        f"Every case runs the real command line as a subprocess on a copy of {res['bundle']}; a "
        "case is handled right when it is served (exit 0) or refused with one `error:` line and "
        "exit 2, as it expects. Reproduce: `make bench-robustness`.",
        "",
        *machine_md(res["machine"], res["command"], res["wall_s"]),
        "",
        "## Summary",
        "",
        "| cases | handled right | tracebacks | wrong exit codes | auto: peak RSS / cgroup limit |",
        "|---|---|---|---|---|",
        f"| {s['cases']} | {s['handled_right']} | {s['tracebacks']} | {s['wrong_exit_codes']} | "
        + (
            f"{s['auto_budget_peak_vs_cgroup_limit']:.3f} at {_mb(res['headline_limit_bytes'])} MB "
            "(the tightest limit auto served under)"
            if s["auto_budget_peak_vs_cgroup_limit"] is not None
            else f"n/a: {s.get('auto_budget_peak_vs_cgroup_limit_reason')}"
        )
        + " |",
        "",
    ]
    if res["not_handled_right"]:
        lines += ["Not handled right: " + ", ".join(res["not_handled_right"]), ""]
    if res["plan_vs_peak"]:
        lines += [
            "## Peak RSS against the memory plan, every stored configuration",
            "",
            "`coalora-run --budget <bits> --max-tokens 64 --threads 2` in a fresh process, "
            "peak RSS (VmHWM, the larger of two runs) against the plan it printed (context 512).",
            "",
            "| bits | plan MB | peak MB | peak / plan |",
            "|---|---|---|---|",
        ]
        for r in res["plan_vs_peak"]:
            lines.append(
                f"| {r['bits']:.2f} | {_mb(r['plan_bytes'])} | {_mb(r['peak_rss_bytes'])} | "
                f"{r['peak_over_plan']:.3f} |"
            )
        lines.append("")
    cg = res["auto_in_cgroups"]
    lines += ["## `--budget auto` in a memory cgroup", ""]
    if isinstance(cg, str):
        lines += [f"Not measured: {cg}", ""]
    else:
        lines += [
            "A fresh child cgroup per limit; the bundle is copied inside it first, so its page "
            "cache is charged to the cgroup.",
            "",
            "| limit MB | exit | bits chosen | plan MB | peak RSS MB | peak / limit | error |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in cg:
            lines.append(
                f"| {r['limit_bytes'] / 1e6:.0f} | {r['exit']} | "
                + (f"{r['bits']:.2f}" if "bits" in r else "–")
                + f" | {_mb(r.get('plan_bytes'))} | {_mb(r['peak_rss_bytes'])} | "
                f"{r['peak_over_limit']:.3f} | {r.get('error', '')} |"
            )
        lines.append("")
    lines += [
        "## Cases",
        "",
        "| group | case | limits | expect | exit | outcome | last stderr line |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in res["cases"]:
        last = r["last_line"].replace("|", "\\|")
        name = r["name"].replace("|", "\\|")
        lines.append(
            f"| {r['group']} | {name} | {r['limits']} | {r['expect']} | "
            f"{r['exit']} | {r['outcome']}{'' if r['handled_right'] else ' (wrong)'} | {last} |"
        )
    if res["skipped"]:
        lines += [
            "",
            "Skipped: " + "; ".join(f"{r['name']} ({r['skipped']})" for r in res["skipped"]),
        ]
    return "\n".join(lines) + "\n"


def write(res: dict[str, Any], out_dir: Path = RESULTS) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    res = with_summary(res, res["summary"])
    (out_dir / f"{NAME}.json").write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
    (out_dir / f"{NAME}.md").write_text(render(res), encoding="utf-8")


def main() -> None:
    p = report_only_parser(__doc__)
    p.add_argument("--bundle", type=Path, help="bundle to copy (default: the demo bundle)")
    p.add_argument("--only", help="run only cases whose name contains this (or this group)")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    args = p.parse_args()
    if args.report_only:
        res = read_result(args.out / f"{NAME}.json")
        (args.out / f"{NAME}.md").write_text(render(res), encoding="utf-8")
        return
    res = run(args.bundle, args.only)
    write(res, args.out)
    print(json.dumps(res["summary"], indent=1))


if __name__ == "__main__":
    main()
