"""Long text with bounded memory: sentence-aligned segments and prompt-prefix reuse.

The talker's KV cache grows by one position per 80 ms frame, so text of any length is spoken as a sequence of
segments that each fit the context window, split at sentence ends and packed up to a token budget; every
segment reuses the same voice prompt and the decoder state carries on, so the audio stays one stream. The
prompt's voice part (role, codec tags, speaker/instruct) is identical across segments and requests, so its KV
positions are kept and only the new positions are prefilled. Torch-free.
"""

from __future__ import annotations

import re

import numpy as np

from .text import TextTokenizer

# A sentence ends at ., !, ? (and their CJK forms), an ellipsis or a line break, plus trailing quotes/space.
_SENTENCE = re.compile(r".+?(?:[.!?…。！？；;]+[\"'”’)\]]*\s*|\n+|$)", re.S)


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text`` with their punctuation and trailing whitespace; joined they give ``text`` back."""
    return [m.group(0) for m in _SENTENCE.finditer(text) if m.group(0)]


def _pack(units: list[str], tokenizer: TextTokenizer, max_tokens: int) -> list[str]:
    """Greedily join consecutive units into runs of at most ``max_tokens`` tokens (a unit over it stays alone)."""
    runs, current = [], ""
    for unit in units:
        if current and len(tokenizer.encode(current + unit)) > max_tokens:
            runs.append(current)
            current = ""
        current += unit
    return runs + [current] if current else runs


def _units(sentence: str, tokenizer: TextTokenizer, max_tokens: int) -> list[str]:
    """A sentence as pieces that each fit: itself, else its words, else (unspaced CJK runs) characters."""
    if len(tokenizer.encode(sentence)) <= max_tokens:
        return [sentence]
    out = []
    for word in re.findall(r"\S+\s*", sentence) or [sentence]:
        fits = len(tokenizer.encode(word)) <= max_tokens
        out.extend([word] if fits else _pack(list(word), tokenizer, max_tokens))
    return _pack(out, tokenizer, max_tokens)


def split_segments(text: str, tokenizer: TextTokenizer, max_tokens: int) -> list[str]:
    """Pack sentences into segments of at most ``max_tokens`` text tokens (a longer sentence is cut at words)."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    pieces = [u for sentence in split_sentences(text) for u in _units(sentence, tokenizer, max_tokens)]
    return [s for s in _pack(pieces, tokenizer, max_tokens) if s.strip()] or [text]


class PrefixReusingTalker:
    """Talker wrapper that keeps the previous prompt's KV and reuses its longest common prefix.

    Prompts for the same voice differ only after the voice part (streaming-text layout: only in the last
    position), so a repeat request prefills one position instead of the whole prompt.
    """

    def __init__(self, talker):
        self.inner = talker
        self._last: np.ndarray | None = None
        self.reused_positions = 0
        self.prefilled_positions = 0

    def __getattr__(self, name: str):
        return getattr(self.inner, name)

    def reset(self) -> None:
        """The KV is kept on purpose; ``prefill`` decides what can be reused."""

    def forget(self) -> None:
        self._last = None
        self.inner.reset()

    def prefill(self, embeds: np.ndarray):
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        n = 0
        if self._last is not None:
            m = min(len(self._last), len(embeds) - 1)  # at least one new position must run to get outputs
            same = np.all(self._last[:m] == embeds[:m], axis=1)
            n = int(m if same.all() else np.argmin(same))
        self._last = None  # if the prefill fails midway, nothing is trusted next time
        if n > 0 and self.inner.n_past >= n:
            self.inner.rewind(n)
            out = self.inner.extend(embeds[n:])
        else:
            n = 0
            out = self.inner.prefill(embeds)
        self._last = embeds.copy()
        self.reused_positions, self.prefilled_positions = n, len(embeds) - n
        return out

    def step(self, embed: np.ndarray):
        return self.inner.step(embed)
