"""N engines and a bounded FIFO queue in front of them: which request speaks on which engine, and when.

Each engine (a ``TTS``) runs up to its ``max_batch`` requests at once (one by default; more share one batched
engine, ``runtime/engine/scheduler.py``), so the pool has ``workers × max_batch`` places. A request checks one
out (``async with pool.checkout() as engine``) and waits for a free one in arrival order; when ``max_queue``
requests are already waiting the next one is refused at once (``QueueFull``, HTTP 429 with ``Retry-After``)
instead of piling up. The engine comes as an ``AsyncTTS``, which runs the request off the event loop (so the loop
stays free to answer other clients; Home Assistant gives ``describe`` one second) and stops it within a frame when
its client goes away. Closing the stream waits for the request's thread, so a place goes back free; should that
wait be cut short (a second cancel at shutdown), the engine's lanes still hold at most ``max_batch`` requests, and
the next one waits for a lane.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from ..aio import AsyncTTS
from ..errors import Qwen3TTSEdgeError

# Frames per decoded chunk in the servers: the first sound after one frame, then two frames a chunk, so a
# cancelled request stops within two frames (the library default grows to eight).
SERVER_CHUNK_FRAMES = (1, 2)


def _max_batch(engine: Any) -> int:
    config = getattr(engine, "config", None)
    return int(getattr(config, "max_batch", 1) or 1)


class QueueFull(Qwen3TTSEdgeError):
    """Every worker is busy and the queue is full; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class PoolClosed(Qwen3TTSEdgeError):
    """The server is shutting down."""


class EnginePool:
    """``workers`` engines behind a FIFO queue of at most ``max_queue`` waiting requests.

    ``engines`` are the ``TTS`` instances (what the servers describe); ``checkout()`` hands them out wrapped.
    """

    def __init__(self, engines: Sequence[Any], max_queue: int = 8):
        if not engines:
            raise ValueError("an engine pool needs at least one engine")
        if max_queue < 0:
            raise ValueError(f"max_queue must be 0 or more, got {max_queue}")
        self.engines = list(engines)
        self.max_queue = max_queue
        self.max_batch = max(_max_batch(engine) for engine in self.engines)
        wrapped = [AsyncTTS(engine) for engine in self.engines]
        # Places interleaved across engines, so requests spread over workers before they batch.
        self._free: deque[AsyncTTS] = deque(atts for _ in range(self.max_batch) for atts, engine in
                                            zip(wrapped, self.engines, strict=True)
                                            if _max_batch(engine) > _)
        self.capacity = len(self._free)
        self._waiters: deque[asyncio.Future] = deque()
        self._closed = False
        self._mean_s = 2.0  # running mean of how long a request holds an engine (for Retry-After)
        self.served = self.rejected = self.failed = 0

    @classmethod
    def load(cls, bundle: str | Path, workers: int = 1, max_queue: int = 8, threads: int | None = None,
             **tts_kwargs: Any) -> EnginePool:
        """Open ``workers`` engines on one bundle (each loads its own weights and runs ``max_batch`` requests at
        once, default 1)."""
        from ..pipeline import TTS

        if workers < 1:
            raise ValueError(f"workers must be 1 or more, got {workers}")
        return cls([TTS(bundle, threads=threads, **tts_kwargs) for _ in range(workers)], max_queue=max_queue)

    @property
    def workers(self) -> int:
        return len(self.engines)

    @property
    def busy(self) -> int:
        """Places held by a request (running, or stopping after a cancel)."""
        return self.capacity - len(self._free)

    @property
    def queued(self) -> int:
        return sum(not f.done() for f in self._waiters)

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the queue ahead, drained by all workers."""
        return max(1, math.ceil(self._mean_s * (self.queued + 1) / self.capacity))

    def health(self) -> dict[str, Any]:
        return {"workers": self.workers, "max_batch": self.max_batch, "capacity": self.capacity,
                "running": self.busy, "busy": self.busy, "queued": self.queued, "max_queue": self.max_queue,
                "served": self.served, "rejected": self.rejected, "failed": self.failed}

    async def _acquire(self) -> AsyncTTS:
        if self._closed:
            raise PoolClosed("the server is shutting down")
        if self._free and not self.queued:
            return self._free.popleft()
        if self.queued >= self.max_queue:
            self.rejected += 1
            wait = self.retry_after()
            raise QueueFull(f"all {self.capacity} places ({self.workers} workers x {self.max_batch} streams) are busy "
                            f"and {self.queued} requests are queued (max {self.max_queue}); retry after {wait} s", wait)
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # an engine was handed over just as the waiter left
                self._release(fut.result())
            raise
        finally:
            if fut in self._waiters:
                self._waiters.remove(fut)

    def _release(self, engine: AsyncTTS) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(engine)
                return
        self._free.append(engine)

    @contextlib.asynccontextmanager
    async def checkout(self) -> AsyncIterator[AsyncTTS]:
        """Hold one engine for a request: the first free one, in arrival order.

        Raises ``QueueFull`` at once when ``max_queue`` requests already wait, ``PoolClosed`` on shutdown. A block
        that ends with an error counts as failed, except the request's own mistakes (answered with a 400); one
        that ends because its client went away (cancelled) counts as neither.
        """
        engine = await self._acquire()
        started = time.perf_counter()
        try:
            yield engine
        except (Qwen3TTSEdgeError, ValueError):
            raise  # the request's own mistake, not the server's
        except Exception:
            self.failed += 1
            raise
        else:
            self.served += 1
        finally:
            self._mean_s = 0.8 * self._mean_s + 0.2 * (time.perf_counter() - started)
            self._release(engine)

    async def drain(self, timeout: float = 10.0) -> bool:
        """Wait until no engine is held (tests, shutdown); False if that took longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not self.busy

    @property
    def closed(self) -> bool:
        """True once ``close`` ran: the pool refuses new requests (a replica's health check reports it)."""
        return self._closed

    def close(self) -> None:
        """Refuse new requests and drop the waiting ones; running requests end with their tasks (shutdown)."""
        self._closed = True
        for fut in self._waiters:
            if not fut.done():
                fut.cancel()
