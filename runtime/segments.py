"""Long text in sentence-aligned segments that each fit the talker's context window.

The talker's KV cache grows by one position per 80 ms frame, so text of any length is spoken as a sequence of
segments, split at sentence ends and packed up to a token budget; every segment reuses the same voice prompt
and the decoder state carries on, so the audio stays one stream. Torch-free.
"""

from __future__ import annotations

import re

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
