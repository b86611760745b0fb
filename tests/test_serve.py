"""The OpenAI-compatible server, started for real (uvicorn on a free loopback port) over tiny
bundles; the official ``openai`` client for chat, completion, streaming and model listing,
httpx for the bad requests."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn

from coalora.runtime.engine import Runtime
from coalora.runtime.serve.app import Server, create_app

PROMPT = "the news market"


@contextlib.contextmanager
def running(server: Server) -> Iterator[str]:
    """Serve ``server`` on a free loopback port in a thread; yields the base URL."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    port = sock.getsockname()[1]
    config = uvicorn.Config(create_app(server), log_level="warning", timeout_graceful_shutdown=1)
    uv = uvicorn.Server(config)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not uv.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        uv.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture(scope="module")
def llama_rt(tiny_llama_bundle: Path) -> Iterator[Runtime]:
    rt = Runtime.open(tiny_llama_bundle, budget="auto", threads=1, context_length=256)
    yield rt
    rt.close()


@pytest.fixture(scope="module")
def served(llama_rt: Runtime) -> Iterator[tuple[Server, str]]:
    server = Server(llama_rt, model_id="tiny", max_waiting=1, default_max_tokens=16)
    with running(server) as url:
        yield server, url


@pytest.fixture(scope="module")
def client(served: tuple[Server, str]) -> openai.OpenAI:
    return openai.OpenAI(base_url=served[1] + "/v1", api_key="unused", max_retries=0)


def _chat(client: openai.OpenAI, **kw):
    args = dict(model="tiny", messages=[{"role": "user", "content": PROMPT}], max_tokens=12)
    return client.chat.completions.create(**{**args, "temperature": 0, **kw})


# -- the openai client -----------------------------------------------------------------------
def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_chat_is_the_runtimes_greedy_answer(client: openai.OpenAI, llama_rt: Runtime) -> None:
    out = _chat(client)
    choice = out.choices[0]
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert 0 < out.usage.completion_tokens <= 12
    expected = llama_rt.generate(PROMPT, max_new_tokens=12)  # the server is idle here
    assert choice.message.content == expected
    assert out.usage.prompt_tokens == len(llama_rt.encode_prompt(PROMPT))


def test_chat_with_system_message(client: openai.OpenAI, llama_rt: Runtime) -> None:
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": PROMPT}]
    out = _chat(client, messages=msgs)
    assert out.choices[0].message.content == llama_rt.generate(
        PROMPT, system="be brief", max_new_tokens=12
    )


def test_stream_equals_the_whole_answer(client: openai.OpenAI) -> None:
    whole = _chat(client).choices[0].message.content
    chunks = list(_chat(client, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    finals = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finals[-1] in ("stop", "length") and all(f is None for f in finals[:-1])
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_completion_and_its_stream(client: openai.OpenAI, llama_rt: Runtime) -> None:
    args = dict(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0)
    out = client.completions.create(**args)
    assert out.choices[0].text == llama_rt.generate(PROMPT, chat=False, max_new_tokens=10)
    streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stream=True))
    assert streamed == out.choices[0].text


def test_seeded_sampling_repeats(client: openai.OpenAI) -> None:
    a = _chat(client, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
    b = _chat(client, temperature=1.0, top_p=0.9, seed=7).choices[0].message.content
    assert a == b


def test_stop_sequence_cuts_the_answer(client: openai.OpenAI) -> None:
    whole = _chat(client, max_tokens=16).choices[0].message.content
    assert len(whole) >= 2
    stop = whole[len(whole) // 2 :][:2]
    out = _chat(client, max_tokens=16, stop=[stop])
    assert out.choices[0].message.content == whole[: whole.find(stop)]
    assert out.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in _chat(client, max_tokens=16, stop=stop, stream=True)
    )
    assert streamed == whole[: whole.find(stop)]


def test_too_long_prompt_is_a_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        _chat(client, messages=[{"role": "user", "content": "news " * 800}])
    assert exc.value.status_code == 400
    assert exc.value.code == "context_length_exceeded"


# -- bad requests, with httpx -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", b"{not json", None),
        ("/v1/chat/completions", b"[1, 2]", None),
        ("/v1/chat/completions", b'{"messages": "hi"}', "messages"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": 3}]}',
            "messages[0].content",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a"}], "max_tokens": "8"}',
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a"}], "temperature": "hot"}',
            "temperature",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a"}], "top_p": 0}',
            "top_p",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a"}], "stream": "yes"}',
            "stream",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a"}], "stop": [1]}',
            "stop",
        ),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "user", "content": "a"}, '
            b'{"role": "assistant", "content": "b"}, {"role": "user", "content": "c"}]}',
            "messages",
        ),
        ("/v1/completions", b'{"prompt": 5}', "prompt"),
        ("/v1/completions", b'{"prompt": "   "}', "prompt"),
        ("/v1/completions", b'{"prompt": "a", "seed": 1.5}', "seed"),
        ("/v1/completions", b'{"prompt": "a", "n": 2}', "n"),
        ("/v1/coalora/budget", b'{"budget": 3}', "budget"),
        ("/v1/coalora/budget", b'{"budget": "3b"}', "budget"),
        ("/v1/coalora/budget", b'{"budget": "0.5bits"}', "budget"),
        ("/v1/classify", b'{"input": "a"}', None),
    ],
)
def test_bad_requests_get_openai_style_400s(
    served: tuple[Server, str], path: str, body: bytes, param: str | None
) -> None:
    r = httpx.post(served[1] + path, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] == param
    assert "Traceback" not in r.text


def test_unknown_endpoint_and_method(served: tuple[Server, str]) -> None:
    r = httpx.get(served[1] + "/v2/nothing")
    assert r.status_code == 404 and r.json()["error"]["message"]
    r = httpx.get(served[1] + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["message"]


# -- health and budget -----------------------------------------------------------------------
def test_health_reports_configuration_plan_and_rss(served: tuple[Server, str]) -> None:
    server, url = served
    h = httpx.get(url + "/health").json()
    sel = server.rt.selection
    assert h["status"] == "ok" and h["task"] == "causal-lm"
    assert h["configuration"]["bits"] == pytest.approx(sel.entry.bits)
    assert h["configuration"]["plan_bytes"]["total"] == sel.plan.total
    assert h["rss_bytes"] > 10_000_000
    assert h["queue"]["busy"] is False and h["queue"]["max_waiting"] == 1


def test_budget_switch_by_hand(served: tuple[Server, str], client: openai.OpenAI) -> None:
    server, url = served
    top = server.rt.selection.entry.bits
    low = min(e.bits for e in server.rt.pareto.entries)
    r = httpx.post(url + "/v1/coalora/budget", json={"budget": f"{low + 0.01:.2f}bits"})
    assert r.status_code == 200, r.text
    assert r.json()["bits"] == pytest.approx(low) and r.json()["previous_bits"] == top
    assert httpx.get(url + "/health").json()["configuration"]["bits"] == pytest.approx(low)
    assert _chat(client).choices[0].message.content == server.rt.generate(PROMPT, max_new_tokens=12)
    r = httpx.post(url + "/v1/coalora/budget", json={"budget": "auto"})
    assert r.json()["bits"] == pytest.approx(top)


# -- the queue ---------------------------------------------------------------------------------
class Gate:
    """Lets the decoder's first ``free`` steps through, then holds every step until
    ``open()``: a request that holds the slot for as long as the test needs. Counts steps."""

    def __init__(self, rt: Runtime, free: int) -> None:
        self.decoder = rt._decoder
        self._run = self.decoder.run
        self.free = free
        self.calls = 0
        self._open = threading.Event()

    def _step(self, *args, **kw):
        self.calls += 1
        if self.calls > self.free:
            self._open.wait(timeout=20)
        return self._run(*args, **kw)

    def open(self) -> None:
        self._open.set()

    def __enter__(self) -> Gate:
        self.decoder.run = self._step
        return self

    def __exit__(self, *exc: object) -> None:
        self.open()
        del self.decoder.run


def _wait_for(fn, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not fn():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


CHAT = {"messages": [{"role": "user", "content": PROMPT}], "temperature": 0}


def test_full_queue_is_a_503_and_a_disconnect_frees_the_slot(
    served: tuple[Server, str], llama_rt: Runtime
) -> None:
    server, url = served
    # Undisturbed, the holder's request takes this many decoder steps.
    with Gate(llama_rt, free=10**6) as undisturbed:
        httpx.post(url + "/v1/chat/completions", json={**CHAT, "max_tokens": 12})
    assert undisturbed.calls >= 6
    queued: dict[str, httpx.Response] = {}
    holder = {**CHAT, "max_tokens": 12, "stream": True}
    with Gate(llama_rt, free=0) as gate, httpx.Client(base_url=url, timeout=30) as http:
        with http.stream("POST", "/v1/chat/completions", json=holder) as stream:
            assert stream.status_code == 200  # admitted: the slot is held, its prefill waits
            waiter = threading.Thread(
                target=lambda: queued.update(
                    r=httpx.post(
                        url + "/v1/chat/completions", json={**CHAT, "max_tokens": 2}, timeout=30
                    )
                )
            )
            waiter.start()
            _wait_for(lambda: server.scheduler.waiting == 1)
            r = http.post("/v1/chat/completions", json={**CHAT, "max_tokens": 2})
            assert r.status_code == 503
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "server_busy"
        # The holder's client has left mid-stream: once the piece in flight is done, the
        # queued request runs, and the holder's other tokens are never computed.
        gate.open()
        waiter.join(timeout=20)
        assert queued["r"].status_code == 200
        holder_steps = gate.calls - queued["r"].json()["usage"]["completion_tokens"]
        assert holder_steps < undisturbed.calls - 2
    _wait_for(lambda: not server.scheduler.busy and server.scheduler.waiting == 0)


def test_a_queued_client_that_leaves_gives_up_its_place(
    served: tuple[Server, str], llama_rt: Runtime
) -> None:
    server, url = served
    served_before = server.scheduler._served
    holder = {**CHAT, "max_tokens": 4, "stream": True}
    with (
        Gate(llama_rt, free=0) as gate,
        httpx.Client(base_url=url, timeout=30) as http,
        http.stream("POST", "/v1/chat/completions", json=holder),
    ):
        leaver = threading.Thread(
            target=lambda: pytest.raises(
                httpx.ReadTimeout, httpx.post, url + "/v1/chat/completions", json=CHAT, timeout=0.5
            )
        )
        leaver.start()
        _wait_for(lambda: server.scheduler.waiting == 1)
        leaver.join()
        _wait_for(lambda: server.scheduler.waiting == 0)  # gone from the queue ...
        assert server.scheduler.busy and gate.calls == 1  # ... while the holder still holds
    _wait_for(lambda: not server.scheduler.busy)
    assert server.scheduler._served == served_before + 1  # the holder; the leaver never ran


# -- api key, classification, the command line ------------------------------------------------
def test_api_key_is_required_when_set(tiny_llama_bundle: Path) -> None:
    rt = Runtime.open(tiny_llama_bundle, threads=1, context_length=64)
    with running(Server(rt, model_id="tiny", api_key="s3cret")) as url:
        bad = openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        assert httpx.get(url + "/health").status_code == 401
        good = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        assert good.models.list().data[0].id == "tiny"
    rt.close()


def test_health_is_unhealthy_once_a_bundle_file_changes(
    tiny_llama_bundle: Path, tmp_path: Path
) -> None:
    import os
    import shutil

    from coalora.runtime.format.spec import PARETO_FILE

    bundle = shutil.copytree(tiny_llama_bundle, tmp_path / "b")
    rt = Runtime.open(bundle, threads=1, context_length=64)
    with running(Server(rt, model_id="tiny")) as url:
        assert httpx.get(url + "/health").status_code == 200
        path = bundle / PARETO_FILE
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten in place
        r = httpx.get(url + "/health")
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["status"] == "bundle changed" and body["changed_files"] == [PARETO_FILE]
    rt.close()


def test_classify_endpoint(tiny_bert_bundle: Path) -> None:
    rt = Runtime.open(tiny_bert_bundle, budget="10bits", threads=1)
    with running(Server(rt, model_id="bert")) as url:
        r = httpx.post(url + "/v1/classify", json={"input": ["a news vote", "the goal"]})
        assert r.status_code == 200, r.text
        data = r.json()["data"]
        assert [d["index"] for d in data] == [0, 1]
        for d, text in zip(data, ["a news vote", "the goal"], strict=True):
            assert d["label"] == rt.classify(text).label
            assert sum(d["probs"].values()) == pytest.approx(1.0)
        r = httpx.post(
            url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )
        assert r.status_code == 400 and r.json()["error"]["code"] == "unsupported_task"
    rt.close()


def test_serve_command_binds_loopback_and_refuses_bad_input(tiny_llama_bundle: Path) -> None:
    cmd = [sys.executable, "-m", "coalora.export.cli", "serve"]
    for args in (["/no/such/bundle"], [str(tiny_llama_bundle), "--port", "abc"]):
        bad = subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=60)
        assert bad.returncode == 2
        assert bad.stderr.strip().count("\n") == 0 and bad.stderr.startswith("error: ")
    proc = subprocess.Popen(
        [*cmd, str(tiny_llama_bundle), "--port", "0", "--threads", "1", "--context", "64"],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = None
        assert proc.stderr is not None
        for line in proc.stderr:
            if "listening on http://" in line:
                url = line.split("listening on ")[1].split()[0]
                break
        assert url is not None and url.startswith("http://127.0.0.1:")
        _wait_for(lambda: _ok(url + "/health"), timeout=20)
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def _ok(url: str) -> bool:
    try:
        return httpx.get(url, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False
