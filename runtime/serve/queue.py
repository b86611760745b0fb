"""One request at a time on the single session, the others waiting in a bounded FIFO queue.

The runtime holds one onnxruntime session and one KV cache, so requests take turns: ``slot()``
admits a request when the session is free, queues it otherwise, and refuses it (``QueueFull``,
an HTTP 503 with Retry-After) when ``max_waiting`` are already queued. A waiter that goes away
(its client disconnected, so its task was cancelled) leaves the queue; a holder that goes away
frees the slot for the next one. Internal work (a memory-driven switch) queues at the front.

All the blocking work runs on ``executor``, one thread: even a token still being computed for
a request whose client has gone finishes there before the next request's work starts.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

T = TypeVar("T")


class QueueFull(Exception):
    """The queue holds ``max_waiting`` requests already."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the server is busy: try again in {retry_after_s} s")
        self.retry_after_s = retry_after_s


class Scheduler:
    def __init__(self, max_waiting: int) -> None:
        if max_waiting < 0:
            raise ValueError(f"the queue size must be >= 0, got {max_waiting}")
        self.max_waiting = max_waiting
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="coalora-session")
        self._busy = False
        self._waiters: deque[asyncio.Future[None]] = deque()
        self._served = 0
        self._busy_s = 0.0  # seconds the slot was held, over ``_served`` requests
        self.rejected = 0

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    @property
    def busy(self) -> bool:
        return self._busy

    def retry_after(self) -> int:
        """Seconds until a place is likely free: the mean request time, times the queue."""
        mean = self._busy_s / self._served if self._served else 1.0
        return max(1, math.ceil(mean * (self.waiting + 1)))

    async def _acquire(self, front: bool) -> None:
        if not self._busy and not self.waiting:
            self._busy = True
            return
        if not front and self.waiting >= self.max_waiting:
            self.rejected += 1
            raise QueueFull(self.retry_after())
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if front:
            self._waiters.appendleft(fut)
        else:
            self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self._release()  # handed the slot just as it was cancelled: pass it on
            else:
                self._waiters.remove(fut)
            raise

    def _release(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot passes straight to the next waiter
                return
        self._busy = False

    async def acquire(self, *, front: bool = False) -> Ticket:
        """Wait for the session; raises ``QueueFull`` when the queue is full. The ticket's
        ``release()`` frees it (idempotent, so every way out may call it)."""
        await self._acquire(front)
        return Ticket(self, counted=not front)

    @asynccontextmanager
    async def slot(self, *, front: bool = False) -> AsyncIterator[None]:
        """Hold the session for the block."""
        ticket = await self.acquire(front=front)
        try:
            yield
        finally:
            ticket.release()

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the session's thread."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)


class Ticket:
    """The session held by one request (or one internal job)."""

    def __init__(self, scheduler: Scheduler, counted: bool) -> None:
        self._scheduler = scheduler
        self._counted = counted
        self._t0 = time.perf_counter()
        self._released = False

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        s = self._scheduler
        if self._counted:
            s._served += 1
            s._busy_s += time.perf_counter() - self._t0
        s._release()
