"""Incremental text: feed pieces (e.g. a chat LLM's tokens) into one running generation.

The talker reads one text token per frame in the streaming-text layout, so text that is still arriving can
be fed as it comes: tokens are committed only once they can no longer change (BPE runs per pre-token, and
only the last pre-token of the text so far can still grow or split), giving exactly the ids the whole text
would give. When the generation catches up with the text, the frame loop *waits* for the next committed
token: the model was trained with one text token per frame until the text ends and ``tts_pad`` only after
it, so a pad mid-sentence would read as "text over". Any arrival timing therefore gives exactly the
whole-text input sequence. When the iterator ends, the end-of-text vector follows the last token. Text that is
pushed (from callbacks, other threads, an event loop) comes through ``TextPieces``. Torch-free.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator

import numpy as np

from .errors import Qwen3TTSEdgeError
from .text import CONTENT_SLICE, TextTokenizer, assistant_text

# How long one frame waits for the next piece of text before the utterance stops (``STOP_TEXT_STALLED``).
DEFAULT_TEXT_TIMEOUT_S = 30.0


class TextError(Qwen3TTSEdgeError, ValueError):
    """Text the tokenizer cannot take (raised while incremental text arrives, or by whole-text validation)."""


class TextStalled(Exception):
    """The text iterator gave no new token within the per-step limit; the frame loop stops with a reason."""


def check_text(text: str) -> None:
    """Refuse text the tokenizer cannot take: lone surrogates (undecodable bytes smuggled in as str)."""
    for i, ch in enumerate(text):
        if "\ud800" <= ch <= "\udfff":
            raise TextError(f"text is not valid Unicode: a lone surrogate {ch!r} at character {i} (undecodable "
                             "bytes?); pass UTF-8 text")


class IncrementalText:
    """Text pieces in, committed content token ids out, equal to tokenizing the whole text at once."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.buffer = ""
        self.committed: list[int] = []

    def _content(self) -> tuple[list[int], list[int | None]]:
        enc = self.tokenizer.tokenizer.encode(assistant_text(self.buffer))
        return enc.ids[CONTENT_SLICE], enc.word_ids[CONTENT_SLICE]

    def _take(self, upto: int, ids: list[int]) -> list[int]:
        if ids[: len(self.committed)] != self.committed:
            # Cannot happen for the Qwen2 pre-tokenizer (only the last pre-token changes); fail loudly if it does.
            raise RuntimeError("incremental tokenization diverged from whole-text tokenization")
        new = ids[len(self.committed):upto]
        self.committed.extend(new)
        return new

    def push(self, piece: str) -> list[int]:
        """Add a piece of text; return the ids that became final because of it."""
        if not isinstance(piece, str):
            raise TypeError(f"text pieces must be str, got {type(piece).__name__}")
        check_text(piece)
        self.buffer += piece
        ids, words = self._content()
        if not ids:
            return []
        last = words[-1]
        stable = next((i for i, w in enumerate(words) if w == last), len(ids))
        return self._take(max(stable, len(self.committed)), ids)

    def finish(self) -> list[int]:
        """The text is complete: return the remaining ids."""
        ids, _ = self._content()
        return self._take(len(ids), ids)


class TextPieces:
    """Text pushed piece by piece, iterated as it comes: the incremental text for callbacks and event loops.

    ``TTS.stream`` takes any iterable of pieces; this one is fed by ``push()`` from any thread or an event loop
    (it never blocks), while its iterator (pulled by the ``TextFeed`` thread) blocks until the next piece.
    ``end()`` completes the text (``end(error)`` makes the iteration raise it, as a failing source would);
    ``close()`` abandons it: the iteration stops at once and later pieces are dropped, since nobody reads them.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queued: deque[str] = deque()
        self._pushed: list[str] = []
        self._ended = self._closed = False
        self._error: BaseException | None = None

    @property
    def text(self) -> str:
        """Everything pushed so far."""
        with self._cond:
            return "".join(self._pushed)

    def push(self, piece: str) -> None:
        if not isinstance(piece, str):
            raise TypeError(f"text pieces must be str, got {type(piece).__name__}")
        with self._cond:
            if self._closed:
                return
            if self._ended:
                raise ValueError("text pushed after end(); give new text its own TextPieces")
            self._queued.append(piece)
            self._pushed.append(piece)
            self._cond.notify_all()

    def end(self, error: BaseException | None = None) -> None:
        with self._cond:
            self._ended, self._error = True, error
            self._cond.notify_all()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._queued.clear()
            self._cond.notify_all()

    def __iter__(self) -> Iterator[str]:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queued or self._ended or self._closed)
                if self._closed:
                    return
                if not self._queued:
                    if self._error is not None:
                        raise self._error
                    return
                piece = self._queued.popleft()
            yield piece


class TextFeed:
    """Pulls an iterator of text pieces on a background thread so generation never waits on it."""

    def __init__(self, pieces: Iterable[str], tokenizer: TextTokenizer):
        self._inc = IncrementalText(tokenizer)
        self._ids: list[int] = []
        self._done = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._pieces = pieces
        self._iter = iter(pieces)
        self._thread = threading.Thread(target=self._pull, name="qwen3-tts-edge-text-feed", daemon=True)
        self._thread.start()

    def _pull(self) -> None:
        try:
            for piece in self._iter:
                if self._stop.is_set():
                    return
                new = self._inc.push(piece)
                if new:
                    with self._cond:
                        self._ids.extend(new)
                        self._cond.notify_all()
            new = self._inc.finish()
        except BaseException as exc:  # re-raised on the generating thread
            with self._cond:
                self._error = exc
                self._done = True
                self._cond.notify_all()
            return
        with self._cond:
            self._ids.extend(new)
            self._done = True
            self._cond.notify_all()

    def _raise(self) -> None:
        if isinstance(self._error, Qwen3TTSEdgeError):
            raise self._error  # a user mistake in the text: its own clear message
        if self._error is not None:
            raise RuntimeError(f"the text iterator failed: {self._error!r}") from self._error

    def wait_for(self, n: int, timeout: float | None = None) -> bool:
        """Block until ``n`` ids are committed or the text ended; True when ``n`` ids are available."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._ids) >= n or self._done or self._stop.is_set(), timeout=timeout)
            self._raise()
            return len(self._ids) >= n

    def wait_for_content(self, timeout: float | None = None) -> bool | None:
        """Block until a token exists and the text so far holds a non-whitespace character, or the text ends.

        True: there is something to speak; False: the text ended empty or whitespace only (the same rule as
        for a whole string); None: nothing arrived within ``timeout``.
        """
        with self._cond:
            ready = self._cond.wait_for(lambda: (self._ids and self._inc.buffer.strip()) or self._done,
                                        timeout=timeout)
            self._raise()
            if not ready:
                return None
            return bool(self._ids) and bool(self._inc.buffer.strip())

    @property
    def ended(self) -> bool:
        with self._cond:
            return self._done

    def available(self) -> tuple[list[int], bool]:
        """Snapshot of (committed ids so far, whether the text has ended)."""
        with self._cond:
            self._raise()
            return list(self._ids), self._done

    def close(self) -> None:
        """Stop pulling (cancellation); the iterator is abandoned after its current piece (``TextPieces``: at once).

        Safe from any thread: a generation waiting for its next token wakes up (and stops as stalled)."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if isinstance(self._pieces, TextPieces):
            self._pieces.close()


class StreamingTextTrack:
    """Text-track vectors for decode steps from a live feed: next token (waiting for it), tts_eos once, then pads.

    ``wait_ms`` is the time spent waiting for text so far.
    """

    def __init__(self, feed: TextFeed, tables, consumed: int, eos_vec: np.ndarray, pad_vec: np.ndarray,
                 timeout_s: float | None = DEFAULT_TEXT_TIMEOUT_S):
        self.feed = feed
        self.tables = tables
        self.consumed = consumed  # tokens already placed in the prompt
        self.eos_vec, self.pad_vec = eos_vec, pad_vec
        self.timeout_s = timeout_s
        self.eos_fed = False
        self.wait_ms = 0.0

    def vector(self, step: int) -> np.ndarray:
        """The text-track vector of decode step ``step``; raises :class:`TextStalled` past the wait limit."""
        ids, done = self.feed.available()
        if self.consumed >= len(ids) and not done:
            t0 = time.perf_counter()
            arrived = self.feed.wait_for(self.consumed + 1, timeout=self.timeout_s)
            self.wait_ms += (time.perf_counter() - t0) * 1e3
            ids, done = self.feed.available()
            if not arrived and not done:
                raise TextStalled(f"no new text within {self.timeout_s:g} s")
        if self.consumed < len(ids):
            vec = self.tables.text_embeds(np.asarray([ids[self.consumed]], dtype=np.int64))[0]
            self.consumed += 1
            return vec
        if not self.eos_fed:  # the text has ended (the wait above guarantees it here)
            self.eos_fed = True
            return self.eos_vec
        return self.pad_vec

    @property
    def finished(self) -> bool:
        """True once the end-of-text vector has been fed (end of speech may follow)."""
        return self.eos_fed

    @property
    def n_text_tokens(self) -> int:
        return self.consumed
