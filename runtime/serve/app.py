"""The OpenAI-compatible HTTP app (starlette) over one ``Runtime``.

    POST /v1/chat/completions   POST /v1/completions   (``stream: true``: server-sent events)
    GET  /v1/models             GET  /health           POST /v1/coalora/budget
    POST /v1/classify           (classifier bundles)

Requests take turns on the single session through ``queue.Scheduler``; the blocking work runs
on its one thread. A client that disconnects, while queued or mid-generation, gives its place
up: its task is cancelled and the iterator it was reading is closed on the session's thread
before the next request runs. With ``--adapt`` a tick re-checks memory between requests.
Every error is an OpenAI-style body; an unexpected one is a 500 without a traceback (logged).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import psutil
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from coalora.runtime.budget import BudgetError, parse_budget
from coalora.runtime.engine import Runtime, RuntimeInputError
from coalora.runtime.profiles import ProfileError
from coalora.runtime.sampling import SamplingParams
from coalora.runtime.selection import SelectionError
from coalora.runtime.serve.protocol import (
    APIError,
    GenerationRequest,
    StopScanner,
    body_object,
    chat_request,
    classify_inputs,
    completion_request,
)
from coalora.runtime.serve.queue import QueueFull, Scheduler, Ticket

log = logging.getLogger("coalora.runtime.serve")

MAX_BODY_BYTES = 1 << 20
DEFAULT_MAX_TOKENS = 256
_END = object()


class ClientGone(Exception):
    """The client disconnected before its answer started."""


def error_response(exc: APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


class SlotResponse(StreamingResponse):
    """A stream that frees its slot however it ends, even if it never started."""

    def __init__(self, content: AsyncIterator[bytes], release: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


class Server:
    """The app's state: the runtime, its scheduler and the served model's name."""

    def __init__(
        self,
        runtime: Runtime,
        *,
        model_id: str,
        max_waiting: int = 16,
        api_key: str | None = None,
        default_max_tokens: int = DEFAULT_MAX_TOKENS,
    ) -> None:
        self.rt = runtime
        self.model_id = model_id
        self.scheduler = Scheduler(max_waiting)
        self._api_key = api_key.encode() if api_key else None
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())
        self._tick: asyncio.Task[None] | None = None

    # -- plumbing ------------------------------------------------------------------------------
    def _check_key(self, request: Request) -> None:
        if self._api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        given = token.strip().encode() if scheme.lower() == "bearer" else b""
        # Constant time: the comparison takes as long whatever prefix matches.
        if not hmac.compare_digest(given, self._api_key):
            raise APIError(
                "invalid or missing API key (send 'Authorization: Bearer KEY')",
                status=401,
                code="invalid_api_key",
            )

    async def _json(self, request: Request) -> Any:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > MAX_BODY_BYTES:
            raise APIError(f"the request body exceeds {MAX_BODY_BYTES} bytes", status=413)
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise APIError(f"the request body exceeds {MAX_BODY_BYTES} bytes", status=413)
        try:
            return json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(f"the request body is not valid JSON: {exc}") from None

    async def _unless_gone(self, request: Request, work: Any) -> Any:
        """Await ``work``; cancel it (leaving the queue or freeing the slot) if the client
        disconnects first."""
        task = asyncio.ensure_future(work)
        watch = asyncio.ensure_future(_disconnected(request))
        try:
            done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            watch.cancel()
        if task in done:
            return task.result()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientGone()

    def _need(self, task: str) -> None:
        if self.rt.task != task:
            what = "text generation" if task == "causal-lm" else "classification"
            other = "/v1/classify" if self.rt.task == "classify" else "/v1/chat/completions"
            raise APIError(
                f"this bundle is a {self.rt.task} model: it does not serve {what} (use {other})",
                code="unsupported_task",
            )

    # -- generation ----------------------------------------------------------------------------
    def _start(self, req: GenerationRequest) -> Iterator[str]:
        """Runs on the session's thread: checks the prompt (400 if bad) and returns the pieces."""
        limit = req.max_tokens or self.default_max_tokens
        try:
            sampling = SamplingParams(temperature=req.temperature, top_p=req.top_p, seed=req.seed)
            return self.rt.stream(
                req.prompt,
                max_new_tokens=limit,
                sampling=sampling,
                chat=req.chat,
                system=req.system,
            )
        except RuntimeInputError as exc:
            long = "context holds" in str(exc)
            raise APIError(
                str(exc),
                param="messages" if req.chat else "prompt",
                code="context_length_exceeded" if long else None,
            ) from None
        except ValueError as exc:
            raise APIError(str(exc)) from None

    def _finish_reason(self, scanner: StopScanner) -> str:
        stats = self.rt.last_stats
        if scanner.stopped or (stats is not None and stats.stopped == "eos"):
            return "stop"
        return "length"

    def _usage(self) -> dict[str, int]:
        s = self.rt.last_stats
        p, c = (s.prompt_tokens, s.new_tokens) if s is not None else (0, 0)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    async def _pieces(self, it: Iterator[str], scanner: StopScanner) -> AsyncIterator[str]:
        """Text as it is generated, cut at stop sequences; closes ``it`` on the session's
        thread however the loop ends (a closed generator frees nothing twice)."""
        try:
            while not scanner.stopped:
                piece = await self.scheduler.run(next, it, _END)
                if piece is _END:
                    break
                text = scanner.push(piece)
                if text:
                    yield text
            rest = scanner.flush()
            if rest:
                yield rest
        finally:
            # Not awaited: a cancelled task must not wait, and the one thread runs this before
            # any later request's work.
            with contextlib.suppress(RuntimeError):  # the executor is gone at shutdown
                self.scheduler.executor.submit(it.close)

    def _envelope(self, req: GenerationRequest, kind: str) -> dict[str, Any]:
        prefix = "chatcmpl" if req.chat else "cmpl"
        return {
            "id": f"{prefix}-{uuid.uuid4().hex[:24]}",
            "object": kind,
            "created": int(time.time()),
            "model": self.model_id,
            "system_fingerprint": f"coalora-{self.rt.selection.entry.bits:.2f}bits",
        }

    async def _complete(self, req: GenerationRequest) -> dict[str, Any]:
        async with self.scheduler.slot():
            it = await self.scheduler.run(self._start, req)
            scanner = StopScanner(req.stop)
            text = "".join([t async for t in self._pieces(it, scanner)])
            finish, usage = self._finish_reason(scanner), self._usage()
        if req.chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish,
            }
            kind = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            kind = "text_completion"
        return {**self._envelope(req, kind), "choices": [choice], "usage": usage}

    async def _open_stream(self, req: GenerationRequest) -> tuple[Iterator[str], Ticket]:
        """Hold the slot and start generating; the caller's stream releases it."""
        ticket = await self.scheduler.acquire()
        try:
            it = await self.scheduler.run(self._start, req)
        except BaseException:
            ticket.release()
            raise
        return it, ticket

    async def _stream_body(self, req: GenerationRequest, it: Iterator[str]) -> AsyncIterator[bytes]:
        env = self._envelope(req, "chat.completion.chunk" if req.chat else "text_completion")
        scanner = StopScanner(req.stop)

        def chunk(content: str | None, finish: str | None, role: bool = False) -> dict:
            if req.chat:
                delta: dict[str, str] = {"role": "assistant"} if role else {}
                if content is not None:
                    delta["content"] = content
                choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                choice = {
                    "index": 0,
                    "text": content or "",
                    "logprobs": None,
                    "finish_reason": finish,
                }
            return {**env, "choices": [choice]}

        if req.chat:
            yield _sse(chunk("", None, role=True))
        async for text in self._pieces(it, scanner):
            yield _sse(chunk(text, None))
        yield _sse(chunk(None, self._finish_reason(scanner)))
        if req.include_usage:
            yield _sse({**env, "choices": [], "usage": self._usage()})
        yield b"data: [DONE]\n\n"

    async def generation(self, request: Request, chat: bool) -> Response:
        self._check_key(request)
        body = await self._json(request)
        req = chat_request(body) if chat else completion_request(body)
        self._need("causal-lm")
        if not req.stream:
            return JSONResponse(await self._unless_gone(request, self._complete(req)))
        it, ticket = await self._unless_gone(request, self._open_stream(req))
        return SlotResponse(self._stream_body(req, it), ticket.release)

    async def chat(self, request: Request) -> Response:
        return await self.generation(request, chat=True)

    async def completion(self, request: Request) -> Response:
        return await self.generation(request, chat=False)

    # -- the other endpoints ---------------------------------------------------------------------
    async def classify(self, request: Request) -> Response:
        self._check_key(request)
        texts = classify_inputs(await self._json(request))
        self._need("classify")

        def work() -> list[dict[str, Any]]:
            out = []
            for i, text in enumerate(texts):
                try:
                    r = self.rt.classify(text)
                except RuntimeInputError as exc:
                    raise APIError(f"input[{i}]: {exc}", param="input") from None
                out.append({"index": i, "label": r.label, "probs": r.probs})
            return out

        async def run() -> list[dict[str, Any]]:
            async with self.scheduler.slot():
                return await self.scheduler.run(work)

        data = await self._unless_gone(request, run())
        return JSONResponse({"object": "list", "model": self.model_id, "data": data})

    def configuration(self) -> dict[str, Any]:
        rt = self.rt
        sel = rt.selection
        e = sel.entry
        return {
            "bits": e.bits,
            "options": dict(sorted(Counter(str(o) for o in e.config.values()).items())),
            "metric_name": rt.pareto.metric_name,
            "metric": e.metric,
            "seen_in_training": e.seen_in_training,
            "budget": str(sel.budget),
            "reason": sel.reason,
            "plan_bytes": sel.plan.to_dict(),
        }

    async def budget(self, request: Request) -> Response:
        self._check_key(request)
        body = body_object(await self._json(request))
        budget, profile = body.get("budget", "auto"), body.get("profile")
        if not isinstance(budget, str):
            raise APIError("'budget' must be a string, e.g. '3.5bits' or '600MB'", param="budget")
        if profile is not None and not isinstance(profile, str):
            raise APIError("'profile' must be a string", param="profile")

        def work() -> dict[str, Any]:
            before = self.rt.selection.entry.bits
            try:
                parsed = parse_budget(budget)
                self.rt.switch(parsed, profile)
            except (BudgetError, SelectionError, ProfileError) as exc:
                param = "profile" if isinstance(exc, ProfileError) else "budget"
                raise APIError(str(exc), param=param) from None
            if self.rt.adapt is not None:  # adapting stays within the new budget
                self.rt.adapt.budget = parsed
            log.info("budget %s: %.2f -> %.2f bits", budget, before, self.rt.selection.entry.bits)
            return {"previous_bits": before, **self.configuration()}

        async def run() -> dict[str, Any]:
            async with self.scheduler.slot():
                return await self.scheduler.run(work)

        return JSONResponse(await self._unless_gone(request, run()))

    async def health(self, request: Request) -> Response:
        self._check_key(request)
        rt, sched = self.rt, self.scheduler
        adapt = rt.adapt
        # The session reads mapped pages of the bundle's files: one changed on disk since it
        # was opened changes (or, truncated, kills) what is served, so the server is unhealthy.
        changed = rt.bundle.changed_files()
        if changed:
            return JSONResponse(
                {
                    "status": "bundle changed",
                    "model": self.model_id,
                    "bundle": str(rt.bundle.root),
                    "changed_files": changed,
                    "message": f"{len(changed)} bundle file(s) changed on disk since the "
                    "bundle was opened; restart the server on an unchanged bundle",
                },
                status_code=503,
            )
        return JSONResponse(
            {
                "status": "ok",
                "model": self.model_id,
                "task": rt.task,
                "bundle": str(rt.bundle.root),
                "context_length": rt.context_length,
                "configuration": self.configuration(),
                "rss_bytes": int(psutil.Process().memory_info().rss),
                "queue": {
                    "busy": sched.busy,
                    "waiting": sched.waiting,
                    "max_waiting": sched.max_waiting,
                    "rejected": sched.rejected,
                },
                "adapt": None
                if adapt is None
                else {
                    "policy": {
                        "margin_down": adapt.policy.margin_down,
                        "margin_up": adapt.policy.margin_up,
                        "hold_s": adapt.policy.hold_s,
                    },
                    "available_bytes": adapt.last.available_bytes if adapt.last else None,
                    "switches": [e.to_dict() for e in list(adapt.events)[-20:]],
                },
            }
        )

    async def models(self, request: Request) -> Response:
        self._check_key(request)
        model = {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "coalora",
        }
        return JSONResponse({"object": "list", "data": [model]})

    # -- memory watch ------------------------------------------------------------------------------
    async def _adapt_loop(self) -> None:
        adapt = self.rt.adapt
        assert adapt is not None
        while True:
            await asyncio.sleep(adapt.policy.interval_s)
            try:
                async with self.scheduler.slot(front=True):
                    await self.scheduler.run(adapt.check)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("adapt check failed")

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self.rt.adapt is not None:
            self._tick = asyncio.create_task(self._adapt_loop())
        try:
            yield
        finally:
            if self._tick is not None:
                self._tick.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._tick
            self.scheduler.close()


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read: nothing else arrives)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def create_app(server: Server) -> Starlette:
    def endpoint(fn: Callable[[Request], Any]) -> Callable[[Request], Any]:
        async def handle(request: Request) -> Response:
            try:
                return await fn(request)
            except APIError as exc:
                return error_response(exc)
            except QueueFull as exc:
                return error_response(
                    APIError(
                        str(exc),
                        status=503,
                        code="server_busy",
                        kind="server_error",
                        headers={"Retry-After": str(exc.retry_after_s)},
                    )
                )
            except ClientGone:
                return Response(status_code=499)
            except Exception as exc:  # never a traceback to the client
                return await server_error(request, exc)

        return handle

    async def not_found(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 404
        message = "no such endpoint" if status == 404 else str(getattr(exc, "detail", exc))
        where = f"{request.method} {request.url.path}"
        return error_response(APIError(f"{where}: {message}", status=status))

    async def server_error(request: Request, exc: Exception) -> Response:
        log.error("internal error on %s", request.url.path, exc_info=exc)
        return error_response(
            APIError("internal server error (see the server log)", status=500, kind="server_error")
        )

    routes = [
        Route("/v1/chat/completions", endpoint(server.chat), methods=["POST"]),
        Route("/v1/completions", endpoint(server.completion), methods=["POST"]),
        Route("/v1/models", endpoint(server.models), methods=["GET"]),
        Route("/health", endpoint(server.health), methods=["GET"]),
        Route("/v1/coalora/budget", endpoint(server.budget), methods=["POST"]),
        Route("/v1/classify", endpoint(server.classify), methods=["POST"]),
    ]
    return Starlette(
        routes=routes,
        exception_handlers={HTTPException: not_found, Exception: server_error},
        lifespan=server.lifespan,
    )
