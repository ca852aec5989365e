"""The streaming machinery of one request: frames made on a worker thread, decoded on the consumer's thread.

A bounded queue sits between them, so a slow consumer applies back-pressure and closing the stream stops the
work within a frame. Frames go into the stateful decoder on a chunk schedule (1 frame first, then growing),
so the first sound comes after the first frame and the stream equals the offline decode of the same codes.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager

import numpy as np

from .engine.contract import DecoderEngine
from .frame_loop import STOP_CANCELLED, Frame, FrameLoop, SegmentEnd
from .options import AudioChunk, StreamStats

__all__ = ["STOP_CANCELLED", "AudioStream", "ChunkAnnouncer", "chunk_frames", "produce_frames", "run_stream"]
_END = object()
_CANCELLED = object()
_POLL_S = 0.05  # how often a consumer waiting for frames looks whether the stream was cancelled


class AudioStream:
    """The chunks of one request, made lazily, with that request's own ``stats`` (filled in as it runs).

    Iterate it (or ``list()`` it); ``close()`` (or leaving a ``with`` block) stops generation at once, from the
    iterating thread. ``cancel()`` does the same from any other thread (an event loop, a barge-in handler): the
    iteration ends within a frame, also while generation waits for incremental text. Each request has its own
    stats, so one process can serve several; ``TTS.last_stats`` is the latest request's.
    """

    def __init__(self, chunks: Iterator[AudioChunk], stats: StreamStats, sample_rate: int,
                 stop: threading.Event | None = None, on_cancel: Callable[[], None] | None = None) -> None:
        self._chunks, self.stats, self.sample_rate = chunks, stats, sample_rate
        self._stop, self._on_cancel = stop or threading.Event(), on_cancel

    def cancel(self) -> None:
        """Stop this request from any thread; the iterating thread's next chunk is the end."""
        self._stop.set()
        if self._on_cancel is not None:
            self._on_cancel()  # e.g. wake a generation that waits for incremental text

    def __iter__(self) -> AudioStream:
        return self

    def __next__(self) -> AudioChunk:
        return next(self._chunks)

    def close(self) -> None:
        self._chunks.close()

    def __enter__(self) -> AudioStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def produce_frames(loops: Iterator[FrameLoop], frames: queue.Queue, stop: threading.Event,
                   idle: Callable[[], AbstractContextManager] = contextlib.nullcontext,
                   finish: Callable[[], None] | None = None,
                   handing_over: Callable[[], None] | None = None) -> None:
    """Worker: run the segments' frame loops into ``frames`` until done, failed or ``stop`` is set.

    Each loop's frames are followed by its :class:`SegmentEnd`; the worker writes no stats (only the consumer
    does), so what a chunk reports is what was decoded, however far ahead generation runs. ``idle`` wraps a
    wait for a full queue (a slow consumer), ``finish`` is called when generation is over (a batched engine
    then stops waiting for this stream), ``handing_over`` before each frame goes into the queue (between
    engine calls: see :class:`ChunkAnnouncer`).
    """

    def put(item: object) -> bool:
        if stop.is_set():
            return False
        try:
            frames.put_nowait(item)
            return True
        except queue.Full:
            pass
        with idle():
            while not stop.is_set():
                try:
                    frames.put(item, timeout=0.05)
                    return True
                except queue.Full:
                    continue
        return False

    def generate() -> object:
        """Every frame and segment end into the queue; what the consumer gets last (None: nothing, stopped)."""
        try:
            for loop in loops:
                gen = iter(loop)
                try:
                    for frame in gen:
                        if handing_over is not None:
                            handing_over()
                        if not put(frame):
                            return None
                finally:
                    gen.close()  # stops an incremental text feed as well
                if not put(loop.segment_end()) or stop.is_set():
                    return None
        except BaseException as exc:  # handed to the consumer, who re-raises it
            return exc
        return _END

    try:
        last = generate()
    finally:
        if finish is not None:
            finish()  # also when stopped or failed
    if last is not None:
        put(last)


def chunk_frames(schedule: Sequence[int], chunk: int) -> int:
    """Frames in chunk number ``chunk`` of ``schedule`` (its last entry repeats)."""
    return schedule[min(chunk, len(schedule) - 1)]


class ChunkAnnouncer:
    """Tells the core share (``runtime/engine/cores.CoreShare``) from the producer's thread that the frame it
    hands over next completes a chunk, while the consumer waits for it: the consumer decodes that chunk at once,
    so the producer's next engine call should already leave the decoder its core. Frames are counted on the same
    schedule the consumer flushes on; a consumer busy elsewhere (a slow client) is not announced, since
    generation would then narrow for a decode that has not begun."""

    def __init__(self, schedule: Sequence[int], announce: Callable[[], None]) -> None:
        self.schedule, self.announce = tuple(schedule), announce
        self.consumer_waiting = threading.Event()
        self._frames = self._chunk = 0
        self._end = chunk_frames(self.schedule, 0)

    def __call__(self) -> None:
        self._frames += 1
        if self._frames < self._end:
            return
        self._chunk += 1
        self._end += chunk_frames(self.schedule, self._chunk)
        if self.consumer_waiting.is_set():
            self.announce()


def run_stream(loops: Iterator[FrameLoop], decoder: DecoderEngine, schedule: Sequence[int],
               ref_codes: np.ndarray | None, prompt_s: float, stats: StreamStats, sample_rate: int,
               max_queued_frames: int, stop: threading.Event | None = None,
               idle: Callable[[], AbstractContextManager] = contextlib.nullcontext,
               finish: Callable[[], None] | None = None,
               decoding: Callable[[], AbstractContextManager] = contextlib.nullcontext,
               announcing: Callable[[], AbstractContextManager] | None = None) -> Iterator[AudioChunk]:
    """Generation on a worker thread, decoding on the consumer's thread, a bounded queue between them.

    Runs lazily: the decoder state belongs to this stream from its first chunk on. Timings count from the
    start of iteration plus the (eager) prompt building, so requests created early don't inflate them. A
    slow consumer blocks the generator once ``max_queued_frames`` wait; closing the iterator, or setting ``stop``
    from another thread, stops it. ``idle`` and ``finish``: see :func:`produce_frames`; ``decoding`` wraps each
    decoder call (a batched engine's turn on the CPU); ``announcing`` (a core share's) wraps the stream and
    yields what a :class:`ChunkAnnouncer` calls.
    """
    t0 = time.perf_counter() - prompt_s
    if ref_codes is not None:
        with decoding():
            decoder.prime(ref_codes)  # clone: continue seamlessly after the reference audio
    else:
        decoder.reset()
    frames: queue.Queue = queue.Queue(maxsize=max_queued_frames)
    stop = stop or threading.Event()
    announcements = contextlib.ExitStack()  # the core share's for this stream: left-over ones go with it
    announcer = (ChunkAnnouncer(schedule, announcements.enter_context(announcing()))
                 if announcing is not None else None)
    worker = threading.Thread(target=produce_frames, args=(loops, frames, stop, idle, finish, announcer),
                              name="qwen3-tts-edge-frames", daemon=True)
    worker.start()
    pending: list[Frame] = []
    first = chunk_index = 0
    segment = 0  # the segment of the last frame decoded

    def flush(final: bool) -> AudioChunk:
        nonlocal first, chunk_index, segment
        t = time.perf_counter()
        codes = np.stack([f.codes for f in pending]) if pending else np.zeros((0, 16), np.int64)
        if pending:
            segment = pending[-1].segment
        if len(codes):
            with decoding():
                pcm = decoder.decode(codes)
        else:
            pcm = np.zeros(0, np.float32)
        stats.decoder_ms += (time.perf_counter() - t) * 1e3
        elapsed = time.perf_counter() - t0
        if stats.ttfa_s is None and len(pcm):
            stats.ttfa_s = elapsed
        chunk = AudioChunk(pcm=pcm, sample_rate=sample_rate, first_frame=first, n_frames=len(codes),
                           elapsed_s=elapsed, final=final, stop_reason=stats.stop_reason if final else None,
                           codes=codes, segment=segment)
        first += len(codes)
        chunk_index += 1
        pending.clear()
        stats.audio_s += len(pcm) / sample_rate
        stats.total_s = elapsed
        return chunk

    def next_item() -> object:
        """The next frame, or _CANCELLED as soon as the stream is cancelled (frames still queued are dropped)."""
        try:
            return frames.get_nowait()
        except queue.Empty:
            pass
        if announcer is not None:
            announcer.consumer_waiting.set()
        try:
            while not stop.is_set():
                try:
                    return frames.get(timeout=_POLL_S)
                except queue.Empty:
                    continue
            return _CANCELLED
        finally:
            if announcer is not None:
                announcer.consumer_waiting.clear()

    try:
        while (item := next_item()) is not _END:
            if item is _CANCELLED or stop.is_set():
                return
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, SegmentEnd):
                stats.add_segment(item)
                continue
            stats.add_frame(item)
            pending.append(item)
            if len(pending) >= chunk_frames(schedule, chunk_index):
                yield flush(final=False)
        stats.stop_reason = stats.segment_stops[-1] if stats.segment_stops else None
        yield flush(final=True)
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue, then wait for it
            try:
                frames.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.05)
        announcements.close()
        if stats.stop_reason is None:
            stats.stop_reason = STOP_CANCELLED
