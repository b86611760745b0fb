#!/usr/bin/env bash
# The smoke cases of `make smoke-arm64`. scripts/smoke_arm64.sh runs this file twice over:
#   - on the host, with the project's own venv, to record the reference output;
#   - inside the arm64 rootfs (chroot, QEMU_CPU=<model>), where it first creates a venv and
#     pip-installs the project with the [runtime] extra (no torch) from PyPI's aarch64 wheels.
#
#   smoke_arm64_inside.sh --label NAME --venv DIR --bundle DIR --out DIR \
#       [--wheel FILE --wheelhouse DIR]
#     --wheel/--wheelhouse  first create a fresh venv at --venv and install the project's
#                           wheel with the [runtime] extra from the wheels in DIR (no index)
#     --measure FILE [--measure-args ARGS]
#                           instead of the cases: python FILE --measure-only --label NAME
#                           --out OUT/measure.json ARGS (benchmarks/arm_paths.py)
#
# Every case's stdout/stderr/exit status lands in --out; failures.txt lists the failed cases
# (a crash by signal is named: SIGILL means the CPU model lacks an instruction some code
# used). Exit status: 0 when every case behaved, else the first crash's 128+signal, else 1.
set -uo pipefail

LABEL="" VENV="" BUNDLE="" OUT="" WHEEL="" WHEELHOUSE="" MEASURE="" MEASURE_ARGS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --label) LABEL=$2; shift 2 ;;
        --venv) VENV=$2; shift 2 ;;
        --bundle) BUNDLE=$2; shift 2 ;;
        --out) OUT=$2; shift 2 ;;
        --wheel) WHEEL=$2; shift 2 ;;
        --wheelhouse) WHEELHOUSE=$2; shift 2 ;;
        --measure) MEASURE=$2; shift 2 ;;
        --measure-args) MEASURE_ARGS=$2; shift 2 ;;
        *) echo "smoke_arm64_inside: unknown argument $1" >&2; exit 2 ;;
    esac
done
[ -n "$LABEL" ] && [ -n "$VENV" ] && [ -n "$BUNDLE" ] && [ -n "$OUT" ] \
    || { echo "smoke_arm64_inside: --label, --venv, --bundle and --out are required" >&2; exit 2; }

# The same prompt, budgets and sampling settings on every machine.
PROMPT="the market team"
BUDGET_LOW=3.5bits
BUDGET_HIGH=6bits
MAX_TOKENS=16
SEED=7

rm -rf "$OUT"
mkdir -p "$OUT"
: >"$OUT/failures.txt"
: >"$OUT/summary.txt"
FIRST_SIGNAL=0
FAILS=0

say() { printf '[%s] %s\n' "$LABEL" "$*"; }
fail() { say "FAIL $*"; echo "$*" >>"$OUT/failures.txt"; FAILS=$((FAILS + 1)); }

# run_case NAME EXPECTED_RC CMD...: stdout -> NAME.out, stderr -> NAME.err, status -> NAME.rc
run_case() {
    local name=$1 want=$2 rc t0 t1 sig
    shift 2
    t0=${EPOCHREALTIME/./}
    "$@" >"$OUT/$name.out" 2>"$OUT/$name.err"
    rc=$?
    t1=${EPOCHREALTIME/./}
    echo "$rc" >"$OUT/$name.rc"
    echo "$name $(((t1 - t0) / 100000))" >>"$OUT/times.txt"  # tenths of a second
    if [ "$rc" -gt 128 ]; then
        sig=$(kill -l $((rc - 128)) 2>/dev/null || echo "?")
        fail "$name: killed by SIG$sig$([ "$sig" = ILL ] && echo ' (Illegal instruction: this CPU model lacks an instruction the code used)') on CPU ${QEMU_CPU:-host}"
        [ "$FIRST_SIGNAL" = 0 ] && FIRST_SIGNAL=$rc
    elif [ "$rc" != "$want" ]; then
        fail "$name: exit $rc, expected $want; last stderr line: $(tail -n1 "$OUT/$name.err")"
    fi
    return 0
}

say "machine $(uname -m), QEMU_CPU=${QEMU_CPU:-<none>}"

# ---------------------------------------------------------------- install (rootfs only)
if [ -n "$WHEEL" ]; then
    t0=$(date +%s)
    rm -rf "$VENV"
    python3 -m venv "$VENV" || { fail "venv creation"; exit 1; }
    # The wheelhouse is bind-mounted (read-only) from the host's .cache/arm64/pip.
    if ! "$VENV/bin/pip" install --progress-bar off -q --no-index --find-links "$WHEELHOUSE" \
        "${WHEEL}[runtime]" >"$OUT/pip.log" 2>&1; then
        tail -20 "$OUT/pip.log"
        fail "pip install .[runtime] (log: pip.log)"
        exit 1
    fi
    echo "pip install .[runtime]: $(($(date +%s) - t0)) s" >>"$OUT/summary.txt"
    say "installed: $("$VENV/bin/pip" freeze 2>/dev/null | grep -Ei '^(onnxruntime|numpy|onnx|tokenizers)==' | tr '\n' ' ')"
fi
PY="$VENV/bin/python"
RUN="$VENV/bin/coalora-run"

if [ -n "$MEASURE" ]; then
    # shellcheck disable=SC2086  # MEASURE_ARGS is a space-separated list of flags
    run_case measure 0 "$PY" "$MEASURE" --measure-only --label "$LABEL" \
        --out "$OUT/measure.json" $MEASURE_ARGS
    cat "$OUT/measure.out" "$OUT/measure.err"
    [ "$FAILS" = 0 ] || exit 1
    exit 0
fi

# ---------------------------------------------------------------- the platform
# HWCAP bits (asm/hwcap.h): ASIMDDP = AT_HWCAP bit 20, I8MM = AT_HWCAP2 bit 13. Then one SDOT
# and one SMMLA executed directly: on a CPU without them the child dies with SIGILL.
run_case platform 0 "$PY" - <<'EOF'
import ctypes, mmap, platform, subprocess, sys

print("machine", platform.machine(), "python", platform.python_version())
if platform.machine() not in ("aarch64", "arm64"):
    print("hwcap: not an arm64 machine, instruction probes skipped")
    raise SystemExit(0)
libc = ctypes.CDLL(None)
libc.getauxval.restype = ctypes.c_ulong
hw, hw2 = libc.getauxval(16), libc.getauxval(26)
print(f"hwcap asimd={bool(hw >> 1 & 1)} asimddp={bool(hw >> 20 & 1)} "
      f"sve={bool(hw >> 22 & 1)} i8mm={bool(hw2 >> 13 & 1)} bf16={bool(hw2 >> 14 & 1)}")
probe = r'''
import ctypes, mmap, sys
code = bytes.fromhex(sys.argv[1]) + bytes.fromhex("c0035fd6")  # <insn>; ret
m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
m.write(code)
ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(m)))()
'''
for name, insn in (("sdot v0.4s,v1.16b,v2.16b", "2094824e"),
                   ("smmla v0.4s,v1.16b,v2.16b", "20a4824e")):
    rc = subprocess.run([sys.executable, "-c", probe, insn]).returncode
    print(f"probe {name}: {'executes' if rc == 0 else 'SIGILL' if rc == -4 else f'rc={rc}'}")
EOF
cat "$OUT/platform.out"

# Self-test of the crash reporting (SMOKE_ARM64_SIGILL_SELFTEST=1): one SDOT executed in the
# case's own process, so a CPU model without dot product kills it with SIGILL.
if [ "${SMOKE_ARM64_SIGILL_SELFTEST:-0}" = 1 ] && [ "$(uname -m)" = aarch64 ]; then
    run_case sigill-selftest 0 "$PY" -c '
import ctypes, mmap
m = mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
m.write(bytes.fromhex("2094824e" "c0035fd6"))  # sdot v0.4s, v1.16b, v2.16b; ret
ctypes.CFUNCTYPE(None)(ctypes.addressof(ctypes.c_char.from_buffer(m)))()
print("sdot executed")'
fi

# ---------------------------------------------------------------- the install has no torch
# Only the device install is checked: the host's venv has the export extra, torch included.
if [ -n "$WHEEL" ]; then
    run_case no-torch 0 "$PY" -c '
import importlib.util, sys
spec = importlib.util.find_spec("torch")
print("torch:", "importable" if spec else "not importable")
sys.exit(1 if spec else 0)'
fi
run_case ort-info 0 "$PY" -c '
import onnxruntime as ort
print("onnxruntime", ort.__version__, ort.get_device(), ort.get_available_providers())'
cat "$OUT/ort-info.out"

# ---------------------------------------------------------------- the CLI
run_case dry-run 0 "$RUN" "$BUNDLE" --budget "$BUDGET_LOW" --dry-run
# The CPU class the runtime finds by itself (HWCAP): what it would avoid as slow here.
run_case cpu-class 0 "$RUN" "$BUNDLE" --budget "$BUDGET_HIGH" --dry-run --json
want_class=""
case "${QEMU_CPU:-}" in
    cortex-a72) want_class=armv8.0 ;;
    cortex-a76) want_class=armv8.2-dotprod ;;
esac
if [ -n "$want_class" ] && ! grep -q "\"cpu\": \"$want_class (HWCAP)\"" "$OUT/cpu-class.out"; then
    fail "cpu-class: expected $want_class (HWCAP) on ${QEMU_CPU}, got: $(grep '"cpu"' "$OUT/cpu-class.out")"
fi
# The budget cases plan as for any CPU ('--device-class any'), so every machine serves the same
# configuration and the tokens can be compared.
for b in "$BUDGET_LOW" "$BUDGET_HIGH"; do
    run_case "gen-$b" 0 "$RUN" "$BUNDLE" --budget "$b" --device-class any --prompt "$PROMPT" \
        --json --max-tokens "$MAX_TOKENS" --seed "$SEED" --temperature 0
done
# A Pi 4 (Cortex-A72, no dot product): the profile's CPU class skips the configurations with
# 2- and 8-bit matrices (slow there: benchmarks/results/arm_paths.md) and serves 4-bit.
run_case gen-rpi4 0 "$RUN" "$BUNDLE" --profile rpi4-2gb --budget "$BUDGET_HIGH" --prompt "$PROMPT" \
    --json --max-tokens "$MAX_TOKENS" --seed "$SEED" --temperature 0
if ! grep -q '"reason": ".*skipped' "$OUT/gen-rpi4.out"; then
    fail "gen-rpi4: the selection skipped no slow configuration: $(grep '"reason"' "$OUT/gen-rpi4.out")"
fi

# Bad input: a budget without its unit is refused with exit 2 and exactly one stderr line.
run_case bad-budget 2 "$RUN" "$BUNDLE" --budget 3.5 --prompt "$PROMPT"
if [ "$(cat "$OUT/bad-budget.rc")" = 2 ]; then
    n=$(grep -c '' "$OUT/bad-budget.err")
    [ "$n" = 1 ] || fail "bad-budget: expected one line on stderr, got $n"
    [ -s "$OUT/bad-budget.out" ] && fail "bad-budget: printed on stdout"
fi

# ---------------------------------------------------------------- the Python API + switch
# Token ids straight from Runtime.generate_ids at open, after switch() and after switching
# back; the logits of every step go to api-logits.npz so the comparison can say how far the
# numbers moved, not only whether the argmax did.
run_case api-switch 0 "$PY" - "$BUNDLE" "$PROMPT" "$BUDGET_LOW" "$BUDGET_HIGH" "$MAX_TOKENS" \
    "$OUT/api-logits.npz" <<'EOF'
import json, sys, time

import numpy as np

from coalora.runtime.engine import Runtime

bundle, prompt, low, high = sys.argv[1:5]
n, logits_file = int(sys.argv[5]), sys.argv[6]
out, logits = {}, {}
rt = Runtime.open(bundle, budget=low, device_class="any")  # the same choice on every CPU
for name, budget in (("open", low), ("switch", high), ("switch-back", low)):
    if name != "open":
        t0 = time.perf_counter()
        rt.switch(budget=budget)
        out[f"{name}_s"] = round(time.perf_counter() - t0, 3)
    steps = []
    decoder = getattr(rt, "_decoder", None)
    run = getattr(decoder, "run", None)
    if run is not None:  # record each step's logits (instance attribute, this process only)
        decoder.run = lambda ids, total, _run=run: steps.append(_run(ids, total)) or steps[-1]
    ids = rt.encode_prompt(prompt)
    t0 = time.perf_counter()
    new = [int(t) for t in rt.generate_ids(ids, max_new_tokens=n)]
    dt = time.perf_counter() - t0
    if steps:
        logits[name] = np.stack(steps).astype(np.float32)
    out[name] = {"budget": budget, "bits": float(rt.selection.entry.bits), "ids": new,
                 "text": rt.tokenizer.decode(new), "wall_tok_s": round(len(new) / dt, 2)}
rt.close()
if logits:
    np.savez(logits_file, **logits)
print(json.dumps(out))
EOF

# ---------------------------------------------------------------- summary
while read -r name ds; do echo "case $name: $((ds / 10)).$((ds % 10)) s"; done <"$OUT/times.txt" >>"$OUT/summary.txt"
if [ "$FAILS" = 0 ]; then
    say "all cases ran"
    exit 0
fi
say "$FAILS case(s) failed:"
sed 's/^/    /' "$OUT/failures.txt"
[ "$FIRST_SIGNAL" != 0 ] && exit "$FIRST_SIGNAL"
exit 1
