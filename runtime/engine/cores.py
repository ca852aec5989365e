"""How generation and the decoder share the CPU cores when together they want more threads than there are cores.

llama.cpp runs a decode on all its threads, which meet at a barrier after every operation: a decoder thread that
takes a core from one of them stalls the whole decode until the kernel's scheduler gives the core back, while
the other llama.cpp threads spin at the barrier. Two policies avoid that:

- :class:`CoreShare` (one stream): generation never stops; while the decoder decodes, llama.cpp decodes on
  the cores the decoder leaves free, and on all of them otherwise. A decode call already running on all
  cores is waited for (one predictor step, a few ms; at most one talker step) before the decoder starts;
  the frame producer announces the frame that completes a chunk, so the call after it already runs narrow and
  the decoder starts at once (the first chunk's wait was up to a talker step, ~20-30 ms of first audio).
- :class:`CoreTurns` (a batch of streams): generation and the streams' decoders take turns; several decoders
  keep every core busy while generation waits. While a batched engine runs one stream only (a server's lone
  request), the turns give way to a :class:`CoreShare`: turns would leave one core idle for every decode.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - platforms without affinity
        return os.cpu_count() or 1


class CoreShare:
    """One stream's engines and its decoder on ``cores`` cores: llama.cpp decodes on ``wide`` threads while the
    decoder is idle and on ``narrow`` (= the cores the decoder leaves) while it decodes.

    Engines with the ``CORE_SHARE`` capability call :meth:`engine_call` around each decode and use the thread
    count it gives; the decoder's calls go through :meth:`decoding`. Measured on 2 cores (bench/README, "Thread
    placement"): the decoder no longer preempts a 2-thread decode, and generation keeps one core meanwhile.
    """

    def __init__(self, wide: int, narrow: int) -> None:
        if not 1 <= narrow <= wide:
            raise ValueError(f"CoreShare needs 1 <= narrow <= wide, got narrow {narrow}, wide {wide}")
        self.wide, self.narrow = int(wide), int(narrow)
        self._cv = threading.Condition()
        self._decoding = 0
        self._expected = 0  # decoder calls announced by the frame producer, not yet begun
        self._wide_calls = 0
        self.calls = {"wide": 0, "narrow": 0}  # engine calls by thread count (read by tests and the bench)
        # decoder calls: announced by the producer, or waiting for a wide call in flight
        self.decoder_calls = {"announced": 0, "waited": 0, "all": 0}

    @classmethod
    def for_threads(cls, threads: int, decoder_threads: int, cores: int | None = None) -> CoreShare | None:
        """The share for ``threads`` llama.cpp threads beside a decoder on ``decoder_threads``, or None when
        both fit the cores at once (nothing to share)."""
        cores = cores or usable_cores()
        if threads + decoder_threads <= cores or threads <= 1:
            return None
        return cls(wide=threads, narrow=max(1, min(threads, cores - decoder_threads)))

    @contextlib.contextmanager
    def engine_call(self) -> Iterator[int]:
        """Around one llama.cpp decode: yields the thread count it should run on now."""
        with self._cv:
            n = self.narrow if self._decoding else self.wide
            wide = n > self.narrow
            if wide:
                self._wide_calls += 1
            self.calls["wide" if wide else "narrow"] += 1
        try:
            yield n
        finally:
            if wide:
                with self._cv:
                    self._wide_calls -= 1
                    if not self._wide_calls:
                        self._cv.notify_all()

    @contextlib.contextmanager
    def announcing(self) -> Iterator[Callable[[], None]]:
        """Around one stream: yields ``announce``, which the frame producer calls (between its engine calls)
        when the frame it hands over completes a chunk the consumer decodes at once; engine calls from then on
        run narrow, and that decoder call need not wait. Announcements left over when the stream ends (it was
        stopped before decoding them) are dropped."""
        try:
            yield self._announce
        finally:
            with self._cv:
                self._decoding -= self._expected
                self._expected = 0
                self._cv.notify_all()

    def _announce(self) -> None:
        with self._cv:
            self._expected += 1
            self._decoding += 1

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        """Around one decoder call: the next engine calls narrow at once, a wide call in flight is waited for."""
        with self._cv:
            self.decoder_calls["all"] += 1
            if self._expected:  # announced: already counted, and no wide call has started since
                self._expected -= 1
                self.decoder_calls["announced"] += 1
            else:
                self._decoding += 1
            if self._wide_calls:
                self.decoder_calls["waited"] += 1
                self._cv.wait_for(lambda: not self._wide_calls)
        try:
            yield
        finally:
            with self._cv:
                self._decoding -= 1


class CoreTurns:
    """A batch's generation and its streams' decoders take turns on the CPU (module doc: why; on 2 cores with
    four streams decoding, a four-row talker decode took 183 ms beside them instead of 31).

    A decoder waits while an engine call runs, and an engine call waits for the decodes already waiting
    (decoders first: they only have work once frames exist, so generation is never starved). At most
    ``decoders`` decode at once.

    With a ``share`` (the engines' :class:`CoreShare`) and ``streams`` (how many streams are open now): while
    at most one is open, an engine call takes no turn and the decoder goes through the share, so generation
    goes on, narrowed, beside the decoder as it does for a single-lane engine. Every decoder call registers with
    the share, so an engine call that starts beside a decoder of the other mode is narrowed too.
    """

    def __init__(self, decoders: int, share: CoreShare | None = None,
                 streams: Callable[[], int] | None = None) -> None:
        if (share is None) != (streams is None):
            raise ValueError("CoreTurns takes a share and a streams count together")
        self.decoders = max(1, int(decoders))
        self.share, self._streams = share, streams
        self._cv = threading.Condition()
        self._engine = False
        self._decoding = self._waiting = 0
        self.solo_calls = 0  # engine calls made without a turn (one stream open; read by tests and the bench)

    def _solo(self) -> bool:
        return self._streams is not None and self._streams() <= 1

    @contextlib.contextmanager
    def engine(self) -> Iterator[None]:
        if self._solo():
            with self._cv:
                self.solo_calls += 1
            yield  # the engine's own share picks its thread count per llama.cpp call
            return
        with self._cv:
            self._cv.wait_for(lambda: not self._decoding and not self._waiting)
            self._engine = True
        try:
            yield
        finally:
            with self._cv:
                self._engine = False
                self._cv.notify_all()

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        shared = self.share.decoding() if self.share is not None else contextlib.nullcontext()
        if self._solo():
            with shared:
                yield
            return
        with self._cv:
            self._waiting += 1
            self._cv.wait_for(lambda: not self._engine and self._decoding < self.decoders)
            self._waiting -= 1
            self._decoding += 1
        try:
            with shared:
                yield
        finally:
            with self._cv:
                self._decoding -= 1
                self._cv.notify_all()
