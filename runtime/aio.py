"""``AsyncTTS``: the runtime for asyncio code (servers, voice assistants, an LLM's reply read aloud as it streams).

``TTS.stream`` is a blocking iterator: frames are made on its own worker thread and decoded on the thread that
iterates it. ``AsyncTTS`` iterates it on a thread per request and hands the chunks to the event loop through a
small bounded buffer, so the loop stays free for other work while a slow consumer still holds generation back.
Text may be a string, pieces, or an ``AsyncIterable[str]`` (an LLM's token stream), which is pumped from the loop
into a ``TextPieces`` feed. A stream that is closed, cancelled or dropped stops generating within a frame, and its
threads end (a plain iterator's text-reading thread after its current piece: nothing can interrupt ``next()``).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from .bundle import Bundle
from .engine.config import EngineConfig
from .options import AudioChunk, SpeakOptions, StreamStats
from .pipeline import TTS
from .text_feed import TextPieces
from .voices.voice_file import Voice

# Decoded chunks that may wait for a slow consumer before the worker holds back (and, through the frame queue
# of ``TTS.stream``, generation too).
BUFFER_CHUNKS = 4
_POLL_S = 0.05  # how often a waiting worker looks whether its consumer has stopped
_END = object()


class AsyncTTS:
    """A ``TTS`` for asyncio: ``astream``, ``asynthesize`` and ``create_voice`` run it off the event loop.

    ``AsyncTTS(tts)`` wraps a loaded engine; ``await AsyncTTS.open(bundle, ...)`` loads one on a thread. As with
    ``TTS``, requests run on its lanes: one at a time by default, up to ``max_batch`` at once, batched on one engine;
    the others wait their turn on their worker threads, not on the loop.
    """

    def __init__(self, tts: TTS):
        self.tts = tts
        self.sample_rate = tts.sample_rate
        self._cloning = threading.Lock()  # one voice clone at a time (the voice encoders load on first use)

    @classmethod
    async def open(cls, bundle: str | Path | Bundle, config: EngineConfig | None = None,
                   **settings: Any) -> AsyncTTS:
        """``TTS(bundle, config, **settings)`` loaded on a thread (it reads and maps the model files), wrapped."""
        return cls(await asyncio.to_thread(TTS, bundle, config, **settings))

    def astream(self, text: str | Iterable[str] | AsyncIterable[str], options: SpeakOptions | None = None,
                **overrides: Any) -> AsyncAudioStream:
        """The chunks of ``text`` as they are made: ``async for chunk in atts.astream(text, speaker="ryan")``.

        The arguments of ``TTS.stream``; ``text`` may also be an ``AsyncIterable[str]``. The request starts at once
        (call this from a coroutine); its request errors (unknown speaker, bad options) raise at the stream's first
        await (``await``, ``async with`` or the first ``async for`` step), before any audio.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            raise RuntimeError("AsyncTTS.astream needs a running event loop: call it from a coroutine (in synchronous "
                               "code use TTS.stream)") from None
        return AsyncAudioStream(self, loop, text, options, overrides)

    async def asynthesize(self, text: str | Iterable[str] | AsyncIterable[str], options: SpeakOptions | None = None,
                          **overrides: Any) -> tuple[np.ndarray, int]:
        """The whole utterance at once: (float32 PCM, sample rate)."""
        async with self.astream(text, options, **overrides) as stream:
            chunks = [chunk.pcm async for chunk in stream]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.float32), self.sample_rate

    async def create_voice(self, audio: Any, ref_text: str | None = None, **kwargs: Any) -> Voice:
        """``TTS.create_voice`` on a thread (the voice encoders, beside the streams)."""
        def clone() -> Voice:
            with self._cloning:
                return self.tts.create_voice(audio, ref_text, **kwargs)

        return await asyncio.to_thread(clone)

    def _work(self, text: Any, options: SpeakOptions | None, overrides: dict[str, Any], bridge: _Bridge,
              pieces: TextPieces | None) -> None:
        """The worker thread of one request: pass ``TTS.stream``'s chunks on (it waits there for a lane)."""
        try:
            _run(self.tts, text, options, overrides, bridge)
        finally:
            if pieces is not None:
                pieces.close()  # the text feed's thread ends with the request
            bridge.finish()


def _run(tts: TTS, text: Any, options: SpeakOptions | None, overrides: dict[str, Any], bridge: _Bridge) -> None:
    try:
        stream = tts.stream(text, options, **overrides)
    except BaseException as exc:  # a request error: the consumer raises it before any audio
        bridge.put(exc)
        return
    bridge.stream = stream
    if bridge.stop.is_set():  # cancelled while the request was being planned
        stream.cancel()
    try:
        with stream:  # closing it stops generation within a frame
            if not bridge.put(stream.stats):
                return
            for chunk in stream:
                if not bridge.put(chunk):
                    return
    except BaseException as exc:
        bridge.put(exc)
        return
    bridge.put(_END)


class _Bridge:
    """One request's hand-off from its worker thread to the event loop.

    At most ``BUFFER_CHUNKS`` items wait, so a slow consumer holds the worker back; ``stop`` releases a worker that
    waits (the consumer is gone). Holds no reference to the consumer's stream object, so dropping that stops it.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: asyncio.Queue = asyncio.Queue()
        self.slots = threading.Semaphore(BUFFER_CHUNKS)
        self.stop = threading.Event()
        self.finished = asyncio.Event()  # the worker thread is done: the engine is free
        self.pump: asyncio.Task | None = None  # the task feeding an async text source
        self.stream: Any = None  # the running AudioStream, once the request is accepted (cancel() reaches it)

    def put(self, item: object) -> bool:
        """From the worker: hand ``item`` over; False once the consumer has stopped or its loop is gone."""
        while not self.slots.acquire(timeout=_POLL_S):
            if self.stop.is_set():
                return False
        if self.stop.is_set():
            return False
        try:
            self.loop.call_soon_threadsafe(self.items.put_nowait, item)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.stop.set()
            return False
        return True

    async def get(self) -> object:
        item = await self.items.get()
        self.slots.release()
        return item

    def finish(self) -> None:
        """From the worker, last."""
        with contextlib.suppress(RuntimeError):  # the loop is closed
            self.loop.call_soon_threadsafe(self._finished)

    def _finished(self) -> None:
        self.finished.set()
        if self.pump is not None:
            self.pump.cancel()  # the rest of the text is not needed any more


async def _pump(source: AsyncIterable[str], pieces: TextPieces) -> None:
    """On the loop: an async text source into ``pieces``; its failure is raised where the text is read."""
    try:
        async for piece in source:
            pieces.push(piece)
    except Exception as exc:
        pieces.end(exc)
    else:
        pieces.end()


class AsyncAudioStream:
    """The chunks of one request on the event loop, with that request's ``stats`` (as ``AudioStream``) once accepted.

    ``async for`` it. ``await`` it, or enter ``async with``, to wait until the request is accepted, which raises its
    request errors. ``aclose()``, leaving ``async with``, cancelling the task that iterates it, or dropping it
    (``break`` out of ``async for atts.astream(...)``) stops generation within a frame; ``aclose()`` also waits
    until the worker thread has finished. ``cancel()`` stops it without waiting, from any thread.
    """

    def __init__(self, atts: AsyncTTS, loop: asyncio.AbstractEventLoop, text: Any, options: SpeakOptions | None,
                 overrides: dict[str, Any]):
        self._ended, self._accepted = False, False
        self._pieces: TextPieces | None = None
        self._bridge = _Bridge(loop)
        self.sample_rate = atts.sample_rate
        self.stats: StreamStats | None = None
        if isinstance(text, AsyncIterable):
            self._pieces = TextPieces()
            self._bridge.pump = loop.create_task(_pump(text, self._pieces))
            text = self._pieces
        threading.Thread(target=atts._work, args=(text, options, overrides, self._bridge, self._pieces),
                         name="qwen3-tts-edge-aio", daemon=True).start()

    async def _take(self) -> object:
        """The next item from the worker; the worker's error raises here, and any exception stops the stream."""
        try:
            item = await self._bridge.get()
        except BaseException:  # cancelled while waiting
            self.cancel()
            raise
        if isinstance(item, BaseException):
            self._ended = True
            raise item
        return item

    async def _accept(self) -> AsyncAudioStream:
        if not self._accepted and not self._ended:
            self.stats = await self._take()
            self._accepted = True
        return self

    def __await__(self):
        return self._accept().__await__()

    def __aiter__(self) -> AsyncAudioStream:
        return self

    async def __anext__(self) -> AudioChunk:
        await self._accept()
        if self._ended:
            raise StopAsyncIteration
        item = await self._take()
        if item is _END:
            self._ended = True
            raise StopAsyncIteration
        return item

    def cancel(self) -> None:
        self._ended = True
        self._bridge.stop.set()
        stream = self._bridge.stream
        if stream is not None:
            stream.cancel()  # the worker's iteration ends within a frame, not at the end of a chunk
        if self._pieces is not None:
            self._pieces.close()  # unblocks a generation waiting for text

    async def aclose(self) -> None:
        self.cancel()
        await self._bridge.finished.wait()

    async def __aenter__(self) -> AsyncAudioStream:
        return await self._accept()

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        self.cancel()


__all__ = ["AsyncTTS", "AsyncAudioStream", "BUFFER_CHUNKS"]
