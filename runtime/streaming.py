"""The streaming machinery of one request: frames made on a worker thread, decoded on the consumer's thread.

A bounded queue sits between them, so a slow consumer applies back-pressure and closing the stream stops the
work within a frame. Frames go into the stateful decoder on a chunk schedule (1 frame first, then growing),
so the first sound comes after the first frame and the stream equals the offline decode of the same codes.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator, Sequence

import numpy as np

from .backends import DecoderBackend
from .frame_loop import FrameLoop
from .options import AudioChunk, StreamStats

STOP_CANCELLED = "cancelled"
_END = object()


class AudioStream:
    """The chunks of one request, made lazily, with that request's own ``stats`` (filled in as it runs).

    Iterate it (or ``list()`` it); ``close()`` (or leaving a ``with`` block) stops generation at once. Each
    request has its own stats, so one process can serve several; ``TTS.last_stats`` is the latest request's.
    """

    def __init__(self, chunks: Iterator[AudioChunk], stats: StreamStats, sample_rate: int) -> None:
        self._chunks, self.stats, self.sample_rate = chunks, stats, sample_rate

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


def produce_frames(loops: Iterator[tuple[int, FrameLoop]], frames: queue.Queue, stop: threading.Event,
                   stats: StreamStats) -> None:
    """Worker: run the segments' frame loops into ``frames`` until done, failed or ``stop`` is set."""

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                frames.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    item: object = _END
    try:
        for index, loop in loops:
            stats.segments = index + 1
            gen = iter(loop)
            try:
                for frame in gen:
                    if not put(frame):
                        return
            finally:
                gen.close()  # stops an incremental text feed as well
            stats.prefill_ms += loop.prefill_ms
            stats.text_wait_ms += loop.text_wait_ms
            stats.segment_stops.append(loop.stop_reason or STOP_CANCELLED)
            stats.prompt_positions_reused += getattr(loop.talker, "reused_positions", 0)
            stats.prompt_positions_prefilled += getattr(loop.talker, "prefilled_positions", len(loop.prompt.embeds))
            if stop.is_set():
                return
    except BaseException as exc:  # handed to the consumer, who re-raises it
        item = exc
    put(item)


def run_stream(loops: Iterator[tuple[int, FrameLoop]], decoder: DecoderBackend, schedule: Sequence[int],
               ref_codes: np.ndarray | None, prompt_s: float, stats: StreamStats, sample_rate: int,
               max_queued_frames: int) -> Iterator[AudioChunk]:
    """Generation on a worker thread, decoding on the consumer's thread, a bounded queue between them.

    Runs lazily: the decoder state belongs to this stream from its first chunk on. Timings count from the
    start of iteration plus the (eager) prompt building, so requests created early don't inflate them. A
    slow consumer blocks the generator once ``max_queued_frames`` wait; closing the iterator stops it.
    """
    t0 = time.perf_counter() - prompt_s
    if ref_codes is not None:
        decoder.prime(ref_codes)  # clone: continue seamlessly after the reference audio
    else:
        decoder.reset()
    frames: queue.Queue = queue.Queue(maxsize=max_queued_frames)
    stop = threading.Event()
    worker = threading.Thread(target=produce_frames, args=(loops, frames, stop, stats), name="qwen3-tts-edge-frames",
                              daemon=True)
    worker.start()
    pending: list[np.ndarray] = []
    first = chunk_index = 0

    def flush(final: bool) -> AudioChunk:
        nonlocal first, chunk_index
        t = time.perf_counter()
        codes = np.stack(pending) if pending else np.zeros((0, 16), np.int64)
        pcm = decoder.decode(codes) if len(codes) else np.zeros(0, np.float32)
        stats.decoder_ms += (time.perf_counter() - t) * 1e3
        elapsed = time.perf_counter() - t0
        if stats.ttfa_s is None and len(pcm):
            stats.ttfa_s = elapsed
        chunk = AudioChunk(pcm=pcm, sample_rate=sample_rate, first_frame=first, n_frames=len(codes),
                           elapsed_s=elapsed, final=final, stop_reason=stats.stop_reason if final else None,
                           codes=codes, segment=max(0, stats.segments - 1))
        first += len(codes)
        chunk_index += 1
        pending.clear()
        stats.audio_s += len(pcm) / sample_rate
        stats.total_s = elapsed
        return chunk

    try:
        while (item := frames.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            stats.frames += 1
            stats.talker_ms += item.talker_ms
            stats.predictor_ms += item.predictor_ms
            stats.host_ms += item.host_ms
            pending.append(item.codes)
            if len(pending) >= schedule[min(chunk_index, len(schedule) - 1)]:
                yield flush(final=False)
        stats.talker_ms -= stats.prefill_ms  # each segment's frame 0 talker time is its prefill
        stats.stop_reason = stats.segment_stops[-1] if stats.segment_stops else None
        yield flush(final=True)
    finally:
        stop.set()
        while worker.is_alive():  # unblock a producer waiting on a full queue, then wait for it
            try:
                frames.get_nowait()
            except queue.Empty:
                worker.join(timeout=0.05)
        if stats.stop_reason is None:
            stats.stop_reason = STOP_CANCELLED
