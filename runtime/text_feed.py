"""Incremental text: feed pieces (e.g. a chat LLM's tokens) into one running generation.

The talker reads one text token per frame in the streaming-text layout, so text that is still arriving can
be fed as it comes: tokens are committed only once they can no longer change (BPE runs per pre-token, and
only the last pre-token of the text so far can still grow or split), giving exactly the ids the whole text
would give. While the generation is ahead of the text, the text track carries ``tts_pad``; when the
iterator ends, the end-of-text vector follows the last token. Torch-free.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

import numpy as np

from .text import TextTokenizer

# Same template as the official code; content = ids[3:-5].
_PREFIX, _SUFFIX = "<|im_start|>assistant\n", "<|im_end|>\n<|im_start|>assistant\n"


class IncrementalText:
    """Text pieces in, committed content token ids out, equal to tokenizing the whole text at once."""

    def __init__(self, tokenizer: TextTokenizer):
        self.tokenizer = tokenizer
        self.buffer = ""
        self.committed: list[int] = []

    def _content(self) -> tuple[list[int], list[int | None]]:
        enc = self.tokenizer.tokenizer.encode(_PREFIX + self.buffer + _SUFFIX)
        return enc.ids[3:-5], enc.word_ids[3:-5]

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


class TextFeed:
    """Pulls an iterator of text pieces on a background thread so generation never waits on it."""

    def __init__(self, pieces: Iterable[str], tokenizer: TextTokenizer):
        self._inc = IncrementalText(tokenizer)
        self._ids: list[int] = []
        self._done = False
        self._error: BaseException | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
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
        if self._error is not None:
            raise RuntimeError(f"the text iterator failed: {self._error!r}") from self._error

    def wait_for(self, n: int, timeout: float | None = None) -> bool:
        """Block until ``n`` ids are committed or the text ended; True when ``n`` ids are available."""
        with self._cond:
            self._cond.wait_for(lambda: len(self._ids) >= n or self._done, timeout=timeout)
            self._raise()
            return len(self._ids) >= n

    def available(self) -> tuple[list[int], bool]:
        """Snapshot of (committed ids so far, whether the text has ended)."""
        with self._cond:
            self._raise()
            return list(self._ids), self._done

    def close(self) -> None:
        """Stop pulling (cancellation); the iterator is abandoned after its current piece."""
        self._stop.set()


class StreamingTextTrack:
    """Text-track vectors for decode steps from a live feed: next token, else tts_pad, then tts_eos once."""

    def __init__(self, feed: TextFeed, tables, consumed: int, eos_vec: np.ndarray, pad_vec: np.ndarray):
        self.feed = feed
        self.tables = tables
        self.consumed = consumed  # tokens already placed in the prompt
        self.eos_vec, self.pad_vec = eos_vec, pad_vec
        self.eos_fed = False
        self.pad_while_waiting = 0

    def vector(self, step: int) -> np.ndarray:
        ids, done = self.feed.available()
        if self.consumed < len(ids):
            vec = self.tables.text_embeds(np.asarray([ids[self.consumed]], dtype=np.int64))[0]
            self.consumed += 1
            return vec
        if done and not self.eos_fed:
            self.eos_fed = True
            return self.eos_vec
        if not done:
            self.pad_while_waiting += 1
        return self.pad_vec

    @property
    def finished(self) -> bool:
        """True once the end-of-text vector has been fed (end of speech may follow)."""
        return self.eos_fed

    @property
    def n_text_tokens(self) -> int:
        return self.consumed
