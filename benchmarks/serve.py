"""The OpenAI-compatible server on the demo bundle: throughput, adapting to memory, eval.

    python -m benchmarks.serve --bundle .cache/demo/smollm2-bbc

Three parts, each on a ``coalora serve`` subprocess (1 onnxruntime thread) over loopback:

1. throughput: 8 concurrent clients (the official ``openai`` client, one thread each) send 20
   short chat requests each (greedy, ``max_tokens`` 16), one after another; requests/s over
   the whole run, p50/p99 latency per request (send to full answer), failures.
2. adapting: ``--adapt`` with two clients sending short requests all along; a memory hog (a
   separate process writing every page of the bytes it takes) takes memory away, holds it,
   and leaves. The limit is emulated: this shared machine has ~19 GB free and no cgroup of
   the benchmark's own, so the server's probe reads a cgroup-v2-style directory
   (``COALORA_CGROUP_ROOT``) whose ``memory.max`` is a limit sized from the server's plan and
   whose ``memory.current`` this script rewrites every 100 ms as the RSS of the server plus
   the hog (psutil). The probe's code path is the real one; only the kernel's accounting is
   replaced. Timeline (``/health`` every 0.5 s, every request) in serve_adapt.png.
3. ``coalora eval`` (device path) at 3 configurations, on the bundle's own held-out blocks
   that its stored figures were measured on, and on every held-out block.

Results: benchmarks/results/serve.{json,md}, serve_adapt.png, serve_eval.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import machine, machine_md

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_BUNDLE = ROOT / ".cache" / "demo" / "smollm2-bbc"
PROMPTS = [
    "What is a budget?",
    "Name a sport played with a ball.",
    "Say hello in French.",
    "What does a central bank do?",
    "Give one word for happy.",
]
CLIENTS = 8
REQUESTS_PER_CLIENT = 20
MAX_TOKENS = 16
THREADS = 1
EVAL_CONFIGS = "3,4.5,6"
MB = 1e6


# -- the server process ----------------------------------------------------------------------
class ServerProcess:
    def __init__(self, bundle: Path, args: list[str], env: dict[str, str] | None = None) -> None:
        cmd = [sys.executable, "-m", "coalora.export.cli", "serve", str(bundle), "--port", "0"]
        self.proc = subprocess.Popen(
            [*cmd, "--threads", str(THREADS), *args],
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        self.log: list[tuple[float, str]] = []
        self.url: str | None = None
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append((time.monotonic(), line.rstrip()))
                if "listening on http://" in line:
                    self.url = line.split("listening on ")[1].split()[0]
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        if not ready.wait(300) or self.url is None:
            self.stop()
            raise RuntimeError("the server did not start:\n" + "\n".join(m for _, m in self.log))
        self._wait_healthy()

    def _wait_healthy(self) -> None:
        import httpx

        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the server never answered /health")

    def health(self) -> dict[str, Any]:
        import httpx

        return httpx.get(self.url + "/health", timeout=10).json()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@contextmanager
def serving(bundle: Path, args: list[str], env: dict[str, str] | None = None) -> Iterator:
    server = ServerProcess(bundle, args, env)
    try:
        yield server
    finally:
        server.stop()


def _client(url: str) -> Any:
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def _request(client: Any, prompt: str) -> dict[str, Any]:
    import openai

    t0 = time.monotonic()
    try:
        r = client.chat.completions.create(
            model="demo",
            messages=[{"role": "user", "content": prompt}],
            max_tokens=MAX_TOKENS,
            temperature=0,
        )
        ok, tokens, fp = True, r.usage.completion_tokens, r.system_fingerprint
    except openai.APIError as exc:
        ok, tokens, fp = False, 0, f"error: {exc}"
    return {"t0": t0, "t1": time.monotonic(), "ok": ok, "tokens": tokens, "fingerprint": fp}


# -- 1. throughput ---------------------------------------------------------------------------
def throughput(bundle: Path, budget: str) -> dict[str, Any]:
    with serving(bundle, ["--budget", budget, "--max-queue", "16", "--quiet"]) as server:
        config = server.health()["configuration"]
        _request(_client(server.url), PROMPTS[0])  # warm-up, not counted
        results: list[list[dict[str, Any]]] = [[] for _ in range(CLIENTS)]

        def run(i: int) -> None:
            client = _client(server.url)
            for k in range(REQUESTS_PER_CLIENT):
                results[i].append(_request(client, PROMPTS[(i + k) % len(PROMPTS)]))

        threads = [threading.Thread(target=run, args=(i,)) for i in range(CLIENTS)]
        t0 = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        rss = server.health()["rss_bytes"]
    flat = [r for rs in results for r in rs]
    lat = np.array([r["t1"] - r["t0"] for r in flat if r["ok"]])
    tokens = sum(r["tokens"] for r in flat)
    return {
        "budget": budget,
        "bits": config["bits"],
        "plan_bytes": config["plan_bytes"]["total"],
        "rss_bytes_after": rss,
        "clients": CLIENTS,
        "requests_per_client": REQUESTS_PER_CLIENT,
        "max_tokens": MAX_TOKENS,
        "requests": len(flat),
        "failed": sum(not r["ok"] for r in flat),
        "wall_s": wall,
        "requests_per_s": len(flat) / wall,
        "tokens_per_s": tokens / wall,
        "p50_latency_s": float(np.percentile(lat, 50)),
        "p99_latency_s": float(np.percentile(lat, 99)),
        "mean_completion_tokens": tokens / len(flat),
    }


# -- 2. adapting under a memory hog ------------------------------------------------------------
HOG = """
import sys, time
import numpy as np
mb, hold = int(sys.argv[1]), float(sys.argv[2])
chunks = []
for _ in range(mb // 16):  # 16 MB at a time, every page written
    chunks.append(np.ones(16 * 2**20, dtype=np.uint8))
    time.sleep(0.01)
print("held", flush=True)
time.sleep(hold)
"""


def _rss(pid: int | None) -> int:
    import psutil

    if pid is None:
        return 0
    try:
        return int(psutil.Process(pid).memory_info().rss)
    except psutil.Error:
        return 0


class EmulatedCgroup:
    """``memory.max`` and ``memory.current`` (server + hog RSS, every 100 ms) in a folder."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.limit: int | None = None
        self.server_pid: int | None = None
        self.hog_pid: int | None = None
        self.current = 0
        self._stop = threading.Event()
        self._write("memory.max", "max")
        self._write("memory.current", "0")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _write(self, name: str, text: str) -> None:
        tmp = self.root / f".{name}.tmp"
        tmp.write_text(text + "\n")
        tmp.replace(self.root / name)  # the probe never reads half a number

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self._write("memory.max", str(limit))

    def _run(self) -> None:
        while not self._stop.wait(0.1):
            self.current = _rss(self.server_pid) + _rss(self.hog_pid)
            self._write("memory.current", str(self.current))

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


def adapt_run(
    bundle: Path, hold_s: float, hog_hold_s: float, hog_fraction: float
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="coalora-cgroup-") as tmp:
        cg = EmulatedCgroup(Path(tmp))
        args = ["--adapt", "--adapt-hold", str(hold_s), "--max-queue", "16"]
        with serving(bundle, args, env={"COALORA_CGROUP_ROOT": tmp}) as server:
            cg.server_pid = server.proc.pid
            t_start = time.monotonic()
            stop = threading.Event()
            requests: list[dict[str, Any]] = []
            timeline: list[dict[str, Any]] = []

            def load(i: int) -> None:
                client = _client(server.url)
                k = 0
                while not stop.is_set():
                    requests.append(_request(client, PROMPTS[(i + k) % len(PROMPTS)]))
                    k += 1

            def watch() -> None:
                while not stop.is_set():
                    try:
                        h = server.health()
                    except Exception:  # noqa: BLE001  (a missed sample is a gap in the plot)
                        time.sleep(0.5)
                        continue
                    timeline.append(
                        {
                            "t": time.monotonic() - t_start,
                            "bits": h["configuration"]["bits"],
                            "plan_bytes": h["configuration"]["plan_bytes"]["total"],
                            "rss_bytes": h["rss_bytes"],
                            "available_bytes": (h["adapt"] or {}).get("available_bytes"),
                            "hog_bytes": _rss(cg.hog_pid),
                            "limit_bytes": cg.limit,
                        }
                    )
                    time.sleep(0.5)

            workers = [threading.Thread(target=load, args=(i,)) for i in range(2)]
            workers.append(threading.Thread(target=watch))
            for w in workers:
                w.start()
            # Warm up under load, then size the limit from what the server really holds: the
            # top configuration keeps half its plan free (above the 10% margin and the 25% it
            # needs to come back up); a hog of half the plan leaves next to nothing.
            time.sleep(8)
            h = server.health()
            plan_top = h["configuration"]["plan_bytes"]["total"]
            bits_top = h["configuration"]["bits"]
            peak_rss = max(x["rss_bytes"] for x in timeline)
            reserve = 256 * 2**20  # the probe's minimum reserve
            cg.set_limit(int(peak_rss + reserve + 0.5 * plan_top))
            time.sleep(6)
            hog_mb = int(hog_fraction * plan_top / 2**20)
            t_hog = time.monotonic() - t_start
            hog = subprocess.Popen(
                [sys.executable, "-c", HOG, str(hog_mb), str(hog_hold_s)],
                stdout=subprocess.PIPE,
                text=True,
            )
            cg.hog_pid = hog.pid
            hog.wait(timeout=600)
            cg.hog_pid = None
            t_hog_end = time.monotonic() - t_start
            # Wait for the switch back up (hold time, then the next check), bounded.
            deadline = time.monotonic() + hold_s + 30
            while time.monotonic() < deadline:
                if server.health()["configuration"]["bits"] >= bits_top - 1e-9:
                    break
                time.sleep(0.5)
            time.sleep(4)
            stop.set()
            for w in workers:
                w.join()
            switches = server.health()["adapt"]["switches"]
            log = [m for _, m in server.log if "adapt:" in m]
        cg.close()
    for sw in switches:  # the server's clock is this one (CLOCK_MONOTONIC)
        sw["t_rel"] = sw["time"] - t_start
    for r in requests:
        r["t0"] -= t_start
        r["t1"] -= t_start
    downs = [s for s in switches if s["direction"] == "down"]
    ups = [s for s in switches if s["direction"] == "up"]
    return {
        "limit_bytes": cg.limit,
        "plan_top_bytes": plan_top,
        "bits_top": bits_top,
        "hog_mb": hog_mb,
        "hog_start_s": t_hog,
        "hog_end_s": t_hog_end,
        "hold_s": hold_s,
        "requests": len(requests),
        "failed_requests": sum(not r["ok"] for r in requests),
        "switches": switches,
        "switched_down": bool(downs),
        "switched_back_up": bool(ups) and ups[-1]["to_bits"] >= bits_top - 1e-9,
        "bits_low": min((s["to_bits"] for s in downs), default=None),
        "log": log,
        "timeline": timeline,
        "request_log": requests,
    }


def plot_adapt(run: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl = run["timeline"]
    t = [x["t"] for x in tl]
    fig, (a, b) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    a.step(t, [x["bits"] for x in tl], where="post", color="C0", label="configuration served")
    floor = min(x["bits"] for x in tl) - 0.3
    for ok, mark, color, what in ((True, "|", "C2", "answered"), (False, "x", "C3", "failed")):
        ends = [r["t1"] for r in run["request_log"] if r["ok"] is ok]
        if ends:
            a.plot(
                ends, [floor] * len(ends), mark, color=color, label=f"request {what} ({len(ends)})"
            )
    a.set_ylabel("bits per weight")
    a.legend(loc="upper right", fontsize=8)
    mb = 1 / MB
    b.plot(t, [x["rss_bytes"] * mb for x in tl], label="server RSS")
    b.plot(t, [x["hog_bytes"] * mb for x in tl], label="memory hog RSS")
    b.plot(t, [(x["available_bytes"] or 0) * mb for x in tl], label="available to the server")
    b.plot(t, [x["plan_bytes"] * mb for x in tl], "--", label="plan of the configuration")
    limits = [(x["t"], x["limit_bytes"] * mb) for x in tl if x["limit_bytes"]]
    if limits:
        b.plot(*zip(*limits, strict=True), ":", color="k", label="emulated limit")
    if limits:  # before the limit is set the server sees the whole machine: off the scale
        b.set_ylim(0, 1.3 * max(v for _, v in limits))
    for ax in (a, b):
        ax.axvspan(run["hog_start_s"], run["hog_end_s"], color="C3", alpha=0.08)
        ax.grid(alpha=0.3)
    b.set_ylabel("MB")
    b.set_xlabel("seconds")
    b.legend(loc="center right", fontsize=8)
    a.set_title("coalora serve --adapt: a memory hog comes and goes (shaded)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- 3. coalora eval -----------------------------------------------------------------------------
def eval_run(
    bundle: Path, data: str, configs: str, blocks: str, plot: Path | None
) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "coalora.export.cli",
        "eval",
        str(bundle),
        "--data",
        data,
        "--configs",
        configs,
        "--blocks",
        blocks,
        "--threads",
        str(THREADS),
        "--json",
        "--quiet",
    ]
    if plot is not None:
        cmd += ["--plot", str(plot)]
    t0 = time.monotonic()
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"coalora eval failed: {out.stderr}")
    return {**json.loads(out.stdout), "wall_s": time.monotonic() - t0}


# -- report --------------------------------------------------------------------------------------
def write_md(data: dict[str, Any], path: Path) -> None:
    s = data["summary"]
    tp, ad = data["throughput"], data["adapt"]
    lines = [
        "# coalora serve on the demo bundle",
        "",
        "Regenerate: `make bench-serve` (the command below).",
        "",
        *machine_md(data["machine"], data["command"], data["wall_s"]),
        f"- onnxruntime threads: {THREADS}; clients and server share the machine's cores",
        "",
        "## Throughput",
        "",
        f"{tp['clients']} concurrent clients (official `openai` client) x "
        f"{tp['requests_per_client']} short chat requests (greedy, max_tokens {tp['max_tokens']}), "
        f"served one at a time from the FIFO queue at {tp['bits']:.2f} bits "
        f"(`--budget {tp['budget']}`):",
        "",
        "| requests | failed | requests/s | completion tokens/s | p50 latency | p99 latency |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {tp['requests']} | {tp['failed']} | {tp['requests_per_s']:.2f} | "
        f"{tp['tokens_per_s']:.1f} | {tp['p50_latency_s']:.2f} s | {tp['p99_latency_s']:.2f} s |",
        "",
        "Latency is from sending to the full answer, queueing included (one session: a "
        f"request waits for those ahead of it); the session's time per request, wall / "
        f"requests, was {tp['wall_s'] / tp['requests']:.3f} s.",
        "",
        "## Adapting to memory (`--adapt`)",
        "",
        f"Two clients send short requests throughout. The limit is emulated (see the "
        f"benchmark's docstring): {ad['limit_bytes'] / MB:.0f} MB, sized so the top "
        f"configuration ({ad['bits_top']:.2f} bits, plan {ad['plan_top_bytes'] / MB:.0f} MB) "
        f"keeps half its plan free; at {ad['hog_start_s']:.0f} s a hog takes {ad['hog_mb']} MiB "
        f"and leaves at {ad['hog_end_s']:.0f} s (hold time {ad['hold_s']:.0f} s).",
        "",
        f"- requests: {ad['requests']}, failed: {ad['failed_requests']}",
        f"- switched down: {'yes' if ad['switched_down'] else 'no'}"
        + (f" (to {ad['bits_low']:.2f} bits)" if ad["bits_low"] else "")
        + f"; back up: {'yes' if ad['switched_back_up'] else 'no'}",
        "",
        "| t (s) | switch | bits | plan | available | reason |",
        "|---:|---|---|---|---:|---|",
    ]
    for sw in ad["switches"]:
        lines.append(
            f"| {sw['t_rel']:.1f} | {sw['direction']} | "
            f"{sw['from_bits']:.2f} -> {sw['to_bits']:.2f} | "
            f"{sw['from_plan_bytes'] / MB:.0f} -> {sw['to_plan_bytes'] / MB:.0f} MB | "
            f"{sw['available_bytes'] / MB:.0f} MB | {sw['reason']} |"
        )
    lines += [
        "",
        "![adapt timeline](serve_adapt.png)",
        "",
        "## coalora eval vs the stored figures",
        "",
    ]
    for key, title in (
        ("eval_stored_blocks", "the blocks the stored figures came from"),
        ("eval_all_blocks", "every held-out block"),
    ):
        ev = data[key]
        name = ev["metric_name"]
        lines += [
            f"On {title}: {ev['data']['description']}; {ev['wall_s']:.0f} s.",
            "",
            f"| bits | {name} (device) | {name} (stored) | device / stored | tokens |",
            "|---:|---:|---:|---:|---:|",
        ]
        for r in ev["configurations"]:
            lines.append(
                f"| {r['bits']:.2f} | {r[name]:.2f} | {r['stored_' + name]:.2f} | "
                f"{r['ratio_to_stored']:.3f} | {r['measured_on']} |"
            )
        lines.append("")
    name = data["eval_stored_blocks"]["metric_name"]
    same = [r["ratio_to_stored"] for r in data["eval_stored_blocks"]["configurations"]]
    every = [r["ratio_to_stored"] for r in data["eval_all_blocks"]["configurations"]]
    lines += [
        "The stored figures were measured on the workstation (torch, fp32 activations); the "
        "device's are onnxruntime's MatMulNBits with int8 activations (accuracy level 4). On "
        f"the same blocks the device's {name} is {min(same):.3f}-{max(same):.3f}x the stored "
        f"one; over every held-out block it is {min(every):.2f}-{max(every):.2f}x: the export's "
        "stored figures rest on a few blocks (the --fast preset's sample), which is what "
        "differs, not the device path.",
        "",
        "![eval](serve_eval.png)",
        "",
        "## Summary",
        "",
        "```json",
        json.dumps(s, indent=1),
        "```",
        "",
    ]
    path.write_text("\n".join(lines), encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--budget", default="4.5bits", help="throughput run's budget")
    ap.add_argument("--hold", type=float, default=8.0, help="--adapt-hold of the adapt run")
    ap.add_argument("--hog-seconds", type=float, default=25.0)
    ap.add_argument("--hog-fraction", type=float, default=0.5, help="hog size / top plan")
    ap.add_argument("--data", default="bbc", help="coalora eval's --data")
    ap.add_argument("--configs", default=EVAL_CONFIGS, help="coalora eval's --configs")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not (args.bundle / "manifest.json").is_file():
        sys.exit(f"error: {args.bundle} is not a bundle (make demo builds the demo bundle)")
    t0 = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    print("throughput ...", flush=True)
    tp = throughput(args.bundle, args.budget)
    print(json.dumps({k: v for k, v in tp.items()}, indent=1), flush=True)
    print("adapt ...", flush=True)
    ad = adapt_run(args.bundle, args.hold, args.hog_seconds, args.hog_fraction)
    print(json.dumps({k: ad[k] for k in ("switches", "failed_requests", "requests")}, indent=1))
    print("eval ...", flush=True)
    ev_stored = eval_run(
        args.bundle, args.data, args.configs, "stored", args.out / "serve_eval.png"
    )
    ev_all = eval_run(args.bundle, args.data, args.configs, "all", None)
    rel = "benchmarks/results"
    # Named as a checkout sees it (the demo bundle lives in .cache/ of whichever checkout).
    shown = (
        Path(*args.bundle.resolve().parts[-3:]) if ".cache" in args.bundle.parts else args.bundle
    )
    command = f"python -m benchmarks.serve --bundle {shown}"
    name = ev_stored["metric_name"]
    summary = {
        "requests_per_s": tp["requests_per_s"],
        "p50_latency_s": tp["p50_latency_s"],
        "p99_latency_s": tp["p99_latency_s"],
        "throughput_failed_requests": tp["failed"],
        "throughput_bits": tp["bits"],
        "adapt": {
            "switched_down": ad["switched_down"],
            "switched_back_up": ad["switched_back_up"],
            "failed_requests": ad["failed_requests"],
            "requests": ad["requests"],
            "bits_top": ad["bits_top"],
            "bits_low": ad["bits_low"],
        },
        "eval": [
            {
                "bits": r["bits"],
                name: r[name],
                f"stored_{name}": r[f"stored_{name}"],
                f"{name}_all_held_out_blocks": a[name],
            }
            for r, a in zip(ev_stored["configurations"], ev_all["configurations"], strict=True)
        ],
    }
    data = {
        "summary": summary,
        "command": command,
        "machine": machine(),
        "wall_s": time.monotonic() - t0,
        "throughput": tp,
        "adapt": ad,
        "eval_stored_blocks": ev_stored,
        "eval_all_blocks": ev_all,
    }
    plot_adapt(ad, args.out / "serve_adapt.png")
    (args.out / "serve.json").write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    write_md(data, args.out / "serve.md")
    print(f"wrote {rel}/serve.md, serve.json, serve_adapt.png, serve_eval.png")


if __name__ == "__main__":
    main()
