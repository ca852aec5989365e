"""N engines, a bounded FIFO queue in front of them, and requests run off the event loop.

A ``TTS`` is not thread-safe, so each worker owns one engine. A request waits for a free engine in arrival
order; when ``max_queue`` requests are already waiting the next one is refused at once (``QueueFull``, HTTP
429 with ``Retry-After``) instead of piling up. The request then runs on the worker's thread and hands its
chunks to the event loop through an asyncio queue, so the loop stays free to answer other clients
(Home Assistant gives ``describe`` one second). ``Job.cancel()`` (a client went away) makes the thread close
the stream after the chunk it is on: with the servers' chunk schedule that is at most two frames, and the
engine goes back to the pool as soon as the thread has stopped, never earlier.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Qwen3TTSEdgeError
from ..options import AudioChunk, StreamStats
from ..streaming import AudioStream

# Frames per decoded chunk in the servers: the first sound after one frame, then two frames a chunk, so a
# cancelled request stops within two frames (the library default grows to eight).
SERVER_CHUNK_FRAMES = (1, 2)


class QueueFull(Qwen3TTSEdgeError):
    """Every worker is busy and the queue is full; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class PoolClosed(Qwen3TTSEdgeError):
    """The server is shutting down."""


_READY, _END = object(), object()


@dataclass(eq=False)
class Job:
    """One request on one engine. Iterate ``chunks()`` on the event loop; ``cancel()`` stops it."""

    loop: asyncio.AbstractEventLoop
    items: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # the thread is done, the engine is back
    stats: StreamStats | None = None
    info: dict[str, Any] = field(default_factory=dict)  # what the prepare step wants to report (usage)
    _ready: bool = False

    def put(self, item: object) -> None:
        """From the worker thread: hand an item to the event loop (dropped if the loop is gone)."""
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # loop closed: nobody is listening any more
            self.cancelled.set()

    async def ready(self) -> None:
        """Wait until the request is accepted by the engine; its request errors (bad voice...) raise here."""
        if self._ready:
            return
        item = await self.items.get()
        if isinstance(item, BaseException):
            raise item
        if item is not _READY:  # pragma: no cover - the worker always sends READY or an error first
            raise RuntimeError("worker protocol error")
        self._ready = True

    async def chunks(self) -> AsyncIterator[AudioChunk]:
        """The chunks as they are made; an error during generation raises here."""
        await self.ready()
        while (item := await self.items.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item

    def cancel(self) -> None:
        self.cancelled.set()


class EnginePool:
    """``workers`` engines behind a FIFO queue of at most ``max_queue`` waiting requests."""

    def __init__(self, engines: Sequence[Any], max_queue: int = 8):
        if not engines:
            raise ValueError("an engine pool needs at least one engine")
        if max_queue < 0:
            raise ValueError(f"max_queue must be 0 or more, got {max_queue}")
        self.engines = list(engines)
        self.max_queue = max_queue
        self._free: deque[Any] = deque(self.engines)
        self._waiters: deque[asyncio.Future] = deque()
        self._executor = ThreadPoolExecutor(max_workers=len(self.engines), thread_name_prefix="qwen3-tts-edge-worker")
        self._jobs: set[Job] = set()
        self._closed = False
        self._mean_s = 2.0  # running mean of how long a request holds an engine (for Retry-After)
        self.served = self.rejected = self.failed = 0

    @classmethod
    def load(cls, bundle: str | Path, workers: int = 1, max_queue: int = 8, threads: int | None = None,
             **tts_kwargs: Any) -> EnginePool:
        """Open ``workers`` engines on one bundle (each loads its own weights; one request at a time each)."""
        from ..pipeline import TTS

        if workers < 1:
            raise ValueError(f"workers must be 1 or more, got {workers}")
        return cls([TTS(bundle, threads=threads, **tts_kwargs) for _ in range(workers)], max_queue=max_queue)

    @property
    def workers(self) -> int:
        return len(self.engines)

    @property
    def busy(self) -> int:
        """Engines held by a request (running, or stopping after a cancel)."""
        return len(self.engines) - len(self._free)

    @property
    def queued(self) -> int:
        return sum(not f.done() for f in self._waiters)

    def retry_after(self) -> int:
        """Seconds until a queue slot is likely free: the queue ahead, drained by all workers."""
        return max(1, math.ceil(self._mean_s * (self.queued + 1) / len(self.engines)))

    def health(self) -> dict[str, Any]:
        return {"workers": self.workers, "busy": self.busy, "queued": self.queued, "max_queue": self.max_queue,
                "served": self.served, "rejected": self.rejected, "failed": self.failed}

    async def _acquire(self) -> Any:
        if self._closed:
            raise PoolClosed("the server is shutting down")
        if self._free and not self.queued:
            return self._free.popleft()
        if self.queued >= self.max_queue:
            self.rejected += 1
            wait = self.retry_after()
            raise QueueFull(f"all {self.workers} workers are busy and {self.queued} requests are queued (max "
                            f"{self.max_queue}); retry after {wait} s", wait)
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

    def _release(self, engine: Any) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(engine)
                return
        self._free.append(engine)

    async def submit(self, prepare: Callable[[Any, Job], AudioStream]) -> Job:
        """Queue a request; ``prepare(engine, job)`` builds its stream on the worker thread.

        Raises ``QueueFull`` at once when the queue is full. The returned job's ``ready()`` raises the
        request's own errors (from ``prepare``); ``chunks()`` yields its audio.
        """
        engine = await self._acquire()
        loop = asyncio.get_running_loop()
        job = Job(loop)
        self._jobs.add(job)
        started = time.perf_counter()

        def done() -> None:
            self._jobs.discard(job)
            self._mean_s = 0.8 * self._mean_s + 0.2 * (time.perf_counter() - started)
            job.finished.set()
            self._release(engine)

        def work() -> None:
            try:
                self._run(engine, prepare, job)
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone (shutdown)
                    loop.call_soon_threadsafe(done)

        try:
            loop.run_in_executor(self._executor, work)
        except RuntimeError:  # executor shut down
            self._release(engine)
            raise PoolClosed("the server is shutting down") from None
        return job

    def _run(self, engine: Any, prepare: Callable[[Any, Job], AudioStream], job: Job) -> None:
        """On the worker thread: build the stream, then pass its chunks on until it ends or is cancelled."""
        try:
            stream = prepare(engine, job)
        except BaseException as exc:  # a request error: reported before any audio
            job.put(exc)
            return
        job.stats = stream.stats
        job.put(_READY)
        try:
            with stream:  # closing stops generation within a frame
                for chunk in stream:
                    if job.cancelled.is_set():
                        break
                    job.put(chunk)
                    if job.cancelled.is_set():
                        break
        except BaseException as exc:
            self.failed += 1
            job.put(exc)
            return
        if not job.cancelled.is_set():
            self.served += 1
        job.put(_END)

    async def call(self, fn: Callable[[Any], Any]) -> Any:
        """Run ``fn(engine)`` on a worker (e.g. cloning a voice), in the same queue as speech requests."""
        engine = await self._acquire()
        try:
            return await asyncio.get_running_loop().run_in_executor(self._executor, fn, engine)
        finally:
            self._release(engine)

    async def drain(self, timeout: float = 10.0) -> bool:
        """Wait until no engine is held (tests, shutdown); False if that took longer than ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.busy and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        return not self.busy

    def close(self) -> None:
        """Refuse new requests, cancel running ones, let the worker threads finish on their own."""
        self._closed = True
        for job in list(self._jobs):
            job.cancel()
        for fut in self._waiters:
            if not fut.done():
                fut.cancel()
        self._executor.shutdown(wait=False, cancel_futures=True)
