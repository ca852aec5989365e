"""Prompt-prefix reuse: prefill only the prompt positions whose KV is not already known.

Two sources of known KV, both exact (the same positions computed before):

- the live sequence: the previous prompt's positions that the new prompt repeats (same voice, next segment);
- saved voice prefixes: the KV state of a prompt's voice part (role, codec tags, speaker or x-vector, an ICL
  reference's transcript; everything before the text to speak, ``Prompt.voice_positions``), saved once per
  voice in a bounded LRU and restored when that voice comes back after others (the engine's saved KV state).

An ICL reference's frames cannot be part of a saved prefix: in both official layouts the text to speak comes
before them (full text) or is summed into their positions (streaming text), so they are prefilled per request.
Assembly wraps a talker in it when the engine declares the ``KV_STATE`` capability (rewind, save and load its
KV state; ``runtime/engine/contract.py``). With continuous batching each sequence has its own live prefix and
all of them share one :class:`SavedPrefixes` store: a voice saved by one sequence restores into any other. Under
a voice pack (LoRA adapters) the same vectors give other KV, so the key also holds the adapter set and scale
(:meth:`PrefixReusingTalker.use_adapter_key`) and the live sequence is not reused across sets. Torch-free.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

import numpy as np

from .engine.config import DEFAULT_CACHE_BYTES
from .engine.contract import PrefillReport, StepOutput


class SavedPrefixes:
    """Saved voice-prefix KV states by key, least recently used dropped first beyond ``cache_bytes``.

    Thread-safe, so the sequences of a batched engine can share one store.
    """

    def __init__(self, cache_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.cache_bytes = int(cache_bytes)
        self._saved: OrderedDict[bytes, tuple[int, np.ndarray]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: bytes) -> tuple[int, np.ndarray] | None:
        with self._lock:
            state = self._saved.get(key)
            if state is not None:
                self._saved.move_to_end(key)
            return state

    def put(self, key: bytes, state: tuple[int, np.ndarray]) -> None:
        with self._lock:
            self._saved[key] = state
            while len(self._saved) > 1 and self._bytes() > self.cache_bytes:
                self._saved.popitem(last=False)  # least recently used first
            if self._bytes() > self.cache_bytes:  # one prefix larger than the whole budget: keep none
                self._saved.clear()

    def clear(self) -> None:
        with self._lock:
            self._saved.clear()

    def _bytes(self) -> int:
        return sum(int(state.nbytes) for _, state in self._saved.values())

    @property
    def voices(self) -> int:
        return len(self._saved)

    @property
    def positions(self) -> int:
        with self._lock:
            return sum(n for n, _ in self._saved.values())

    @property
    def nbytes(self) -> int:
        with self._lock:
            return self._bytes()


class PrefixReusingTalker:
    """The frame loop's talker (a ``PromptTalker``) over an engine with ``KV_STATE``: keeps the previous prompt's
    KV and the voice prefixes of recent voices.

    ``prefill(prompt)`` reuses the longest known prefix and prefills the rest; ``last_prefill`` says what the
    last prefill did. ``saved``: a store shared with other sequences (default: its own of ``cache_bytes``).
    """

    def __init__(self, talker, *, cache_bytes: int = DEFAULT_CACHE_BYTES, saved: SavedPrefixes | None = None):
        self.inner = talker
        self.hidden_size = talker.hidden_size
        self.placement = talker.placement
        self._last: np.ndarray | None = None
        self.saved = saved if saved is not None else SavedPrefixes(cache_bytes)
        self.cache_bytes = self.saved.cache_bytes
        self.can_save = self.cache_bytes > 0
        self.last_prefill = PrefillReport()
        self._adapter_key = b""  # the adapter set (and scale) the engine runs now; b"": the base model

    @property
    def n_ctx(self) -> int | None:
        return self.inner.n_ctx

    @property
    def n_past(self) -> int:
        return self.inner.n_past

    @property
    def reused_positions(self) -> int:
        return self.last_prefill.reused

    @property
    def prefilled_positions(self) -> int:
        return self.last_prefill.prefilled

    def forget(self) -> None:
        """Drop everything known: the live sequence and the saved voice prefixes."""
        self._last = None
        self.saved.clear()
        self.inner.reset()

    def use_adapter_key(self, key: bytes) -> None:
        """The engine now runs the adapter set ``key`` (``runtime/engine/adapters.py``): KV computed under another
        set is never reused, neither the live sequence nor saved prefixes (their keys include ``key``)."""
        if key != self._adapter_key:
            self._last = None
            self._adapter_key = key

    def forget_live(self) -> None:
        """Forget the live sequence only (its cells were freed); saved prefixes stay."""
        self._last = None

    @property
    def saved_voices(self) -> int:
        return self.saved.voices

    @property
    def saved_positions(self) -> int:
        return self.saved.positions

    @property
    def saved_bytes(self) -> int:
        return self.saved.nbytes

    def prefill(self, prompt) -> StepOutput:
        """Start the sequence of ``prompt`` (a ``runtime.prompt.Prompt``), reusing what is known of it."""
        return self.prefill_embeds(prompt.embeds, voice_positions=prompt.voice_positions)

    def prefill_embeds(self, embeds: np.ndarray, voice_positions: int = 0) -> StepOutput:
        """``prefill`` for raw prompt vectors, ``voice_positions`` of them the voice part (0: none saved)."""
        embeds = np.ascontiguousarray(embeds, dtype=np.float32)
        # At least one new position must run to get outputs.
        fixed = voice_positions if self.can_save and 0 < voice_positions < len(embeds) else 0
        live = self._live_prefix(embeds)
        self._last = None  # if the prefill fails midway, nothing is trusted next time
        key = hashlib.sha256(self._adapter_key + embeds[:fixed].tobytes()).digest() if fixed else b""
        state = self.saved.get(key) if fixed > live else None
        if state is not None:
            self.inner.load_state(state)
            n = fixed
        else:
            n = live
            if n > 0:
                self.inner.rewind(n)
        if fixed > n:  # a voice not seen lately: compute its prefix alone, save it, then the rest
            self._run(embeds[n:fixed], start=n)
            self.saved.put(key, self.inner.save_state())
            out = self.inner.extend(embeds[fixed:])
        else:
            out = self._run(embeds[n:], start=n)
        self._last = embeds.copy()
        self.last_prefill = PrefillReport(reused=n, prefilled=len(embeds) - n)
        return out

    def _live_prefix(self, embeds: np.ndarray) -> int:
        """Positions the live sequence shares with ``embeds`` (0 when nothing is live)."""
        if self._last is None:
            return 0
        m = min(len(self._last), len(embeds) - 1)
        same = np.all(self._last[:m] == embeds[:m], axis=1)
        n = int(m if same.all() else np.argmin(same))
        return n if self.inner.n_past >= n else 0

    def _run(self, embeds: np.ndarray, *, start: int):
        return self.inner.extend(embeds) if start > 0 else self.inner.prefill(embeds)

    def step(self, embed: np.ndarray) -> StepOutput:
        return self.inner.step(embed)
