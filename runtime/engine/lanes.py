"""Lanes: what one request runs on, handed out so that several requests can share one ``TTS``.

A lane is a frame-loop talker, a predictor and a decoder state. With ``max_batch`` 1 (the default) there is
one lane, the engines themselves, and a request waits for it: one request at a time, as before, but safe to
call from several threads. With ``max_batch`` N there are N lanes, one sequence each of a
:class:`~runtime.engine.scheduler.BatchScheduler`, with a decoder of their own forked from the loaded one;
requests beyond N wait for a lane in arrival order.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from ..prefix_cache import PrefixReusingTalker, SavedPrefixes
from .contract import DecoderEngine, PredictorEngine, PromptTalker, prompt_talker
from .scheduler import BatchScheduler, SequencePredictor, SequenceTalker

_POLL_S = 0.05  # how often a request waiting for a lane looks whether it was cancelled


@dataclass
class Lane:
    """One request's engines. ``idle`` wraps the request's waits outside the engine (text, a slow consumer);
    ``finish`` says its generation is over (its decoder may still be draining)."""

    talker: PromptTalker
    predictor: PredictorEngine
    decoder: DecoderEngine
    idle: Callable[[], AbstractContextManager] = contextlib.nullcontext
    finish: Callable[[], None] = field(default=lambda: None)
    decoding: Callable[[], AbstractContextManager] = contextlib.nullcontext  # around each decoder call
    # around a stream: yields the callable the frame producer announces a chunk's last frame with (CoreShare)
    announcing: Callable[[], AbstractContextManager] | None = None
    seq: int | None = None


class LanePool:
    """Lanes handed out one per request; :meth:`lease` waits for a free one in arrival order."""

    size = 1

    def __init__(self) -> None:
        self._cv = threading.Condition()
        self._queue: deque[object] = deque()
        self.in_use = 0

    @property
    def waiting(self) -> int:
        with self._cv:
            return len(self._queue)

    @contextlib.contextmanager
    def lease(self, stop: threading.Event | None = None) -> Iterator[Lane | None]:
        """A lane for one request (None if ``stop`` was set while it waited); given back on exit."""
        lane = self._acquire(stop)
        try:
            yield lane
        finally:
            if lane is not None:
                self._release(lane)

    def _acquire(self, stop: threading.Event | None) -> Lane | None:
        ticket = object()
        with self._cv:
            self._queue.append(ticket)
            try:
                while True:
                    if stop is not None and stop.is_set():
                        return None
                    if self._queue[0] is ticket and self.in_use < self.size:
                        lane = self._open()
                        if lane is not None:
                            self.in_use += 1
                            return lane
                    self._cv.wait(_POLL_S)
            finally:
                self._queue.remove(ticket)
                self._cv.notify_all()

    def _release(self, lane: Lane) -> None:
        try:
            self._close(lane)
        finally:
            with self._cv:
                self.in_use -= 1
                self._cv.notify_all()

    def _open(self) -> Lane | None:
        raise NotImplementedError

    def _close(self, lane: Lane) -> None:
        pass

    def forget(self) -> None:
        """Drop what the lanes keep between requests (saved voice prefixes)."""


class SingleLane(LanePool):
    """One lane, the engines themselves: requests run one at a time."""

    def __init__(self, talker: PromptTalker, predictor: PredictorEngine, decoder: DecoderEngine,
                 decoding: Callable[[], AbstractContextManager] = contextlib.nullcontext,
                 announcing: Callable[[], AbstractContextManager] | None = None) -> None:
        super().__init__()
        self.lane = Lane(talker, predictor, decoder, decoding=decoding, announcing=announcing)

    def _open(self) -> Lane:
        return self.lane


class BatchedLanes(LanePool):
    """``scheduler.max_batch`` lanes over one scheduler: a sequence each, one shared store of voice prefixes,
    decoders forked from ``decoder`` (kept per sequence, so a primed voice state stays with its lane)."""

    def __init__(self, scheduler: BatchScheduler, decoder: Any, *, prefix_cache: bool, cache_bytes: int) -> None:
        super().__init__()
        self.scheduler, self.size = scheduler, scheduler.max_batch
        self.saved = SavedPrefixes(cache_bytes)
        self._reuse = prefix_cache and cache_bytes > 0
        self._decoder = decoder
        self._talkers: dict[int, PromptTalker] = {}
        self._decoders: dict[int, Any] = {}

    def _open(self) -> Lane | None:
        seq = self.scheduler.open()
        if seq is None:
            return None
        if seq not in self._talkers:
            engine = SequenceTalker(self.scheduler, seq)
            self._talkers[seq] = (PrefixReusingTalker(engine, saved=self.saved) if self._reuse
                                  else prompt_talker(engine, prefix_cache=False))
            self._decoders[seq] = self._decoder if seq == 0 else self._decoder.fork()
        talker = self._talkers[seq]
        return Lane(talker, SequencePredictor(self.scheduler, seq), self._decoders[seq], idle=talker.inner.parked,
                    finish=lambda: self.scheduler.set_parked(seq, True), decoding=self.scheduler.turns.decoding,
                    seq=seq)

    def use_adapters(self, lane: Lane, aset: Any) -> None:
        """The request on ``lane`` runs under the adapter set ``aset`` (a voice pack; released when the lane is
        given back): its sequence joins that set's group, and its saved voice prefixes are keyed on it."""
        self.scheduler.use_adapters(lane.seq, aset)
        if self._reuse:
            self._talkers[lane.seq].use_adapter_key(aset.key)

    def _close(self, lane: Lane) -> None:
        self.scheduler.close_sequence(lane.seq)
        talker = self._talkers[lane.seq]
        talker.inner.freed()
        if isinstance(talker, PrefixReusingTalker):
            talker.forget_live()

    def forget(self) -> None:
        self.saved.clear()
