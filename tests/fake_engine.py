"""A fake engine for every role of the engine contract (runtime/engine/contract.py): pure numpy, deterministic.

It is small, exact and fast, so tests can run the frame loop, the prefix cache, the streaming pipeline and a
whole ``TTS`` request without a model file, and so ``tests/test_engine_contract.py`` can check the contract's
properties on an engine whose every answer is known.

- :class:`FakeTalker`: a one-layer causal attention over the cached positions. Each position's key depends on
  its embedding and its index, so the output at the last position is a function of the whole history: a
  talker that rewinds, restores or appends wrongly gives other numbers. Declares ``KV_STATE``.
- :class:`FakePredictor`: 15 heads over a recurrent state, each code feeding the next step. Greedy and
  sampling run "in the engine" (sampling takes the frame's 15 uniforms up front, like the fused ONNX graph); a
  host chooser is called once per step. Declares no capability.
- :class:`FakeTables`: text rows made per id on demand (a real 151k vocabulary costs nothing), codec and
  residual tables; ``frame_embeds`` = E(c0) + the 15 residual rows.
- :class:`FakeDecoder`: a stateful synthesiser (phase and previous frame carried over), so any chunking of a
  code stream gives the same PCM. Keeps primed states: declares ``DECODER_PRIMED_CACHE``.

Sizes come from :class:`FakeDims`: the real vocabularies and code groups with small widths by default, or a
bundle manifest's with :meth:`FakeDims.from_manifest`.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from qwen3_tts_edge.runtime.engine.contract import (
    DECODER_PRIMED_CACHE,
    KV_STATE,
    GenerationEngines,
    Placement,
    StepOutput,
    checked_ids,
    split_frame_codes,
)
from qwen3_tts_edge.runtime.sampler import GREEDY, ResidualSampling, draw

PLACEMENT = Placement(device="cpu", note="numpy fake engine")


@dataclass(frozen=True)
class FakeDims:
    hidden_size: int = 32
    predictor_width: int = 16
    text_vocab_size: int = 151936  # text rows are made on demand: a real vocabulary costs nothing
    codec_vocab_size: int = 3072
    codebook_size: int = 2048
    num_steps: int = 15
    samples_per_frame: int = 16
    sample_rate: int = 24000
    n_ctx: int | None = 512

    @classmethod
    def from_manifest(cls, manifest: Any, *, n_ctx: int | None = 2048) -> FakeDims:
        """The vocabularies, code groups and audio framing of a bundle (widths stay small)."""
        talker, audio = manifest.model["talker"], manifest.audio
        return cls(hidden_size=int(talker["hidden_size"]), text_vocab_size=int(talker["text_vocab_size"]),
                   codec_vocab_size=int(talker["vocab_size"]), codebook_size=int(audio["codebook_size"]),
                   num_steps=int(talker["num_code_groups"]) - 1, samples_per_frame=int(audio["samples_per_frame"]),
                   sample_rate=int(manifest.audio["sample_rate"]), n_ctx=n_ctx)


def _rng(seed: int, *names: object) -> np.random.Generator:
    digest = hashlib.sha256(":".join(map(str, (seed, *names))).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _normal(seed: int, name: str, shape: tuple[int, ...], std: float) -> np.ndarray:
    return _rng(seed, name).standard_normal(shape) * std


class FakeTalker:
    """Causal one-layer attention with a KV cache of (key, value) rows; outputs of the last position."""

    capabilities = frozenset({KV_STATE})

    def __init__(self, dims: FakeDims = FakeDims(), seed: int = 0) -> None:
        h = self.hidden_size = dims.hidden_size
        self._n_ctx = dims.n_ctx
        s = 1 / np.sqrt(h)
        self._wk, self._wv, self._wq, self._wo = (_normal(seed, f"talker.{n}", (h, h), s) for n in "kvqo")
        self._pos = _normal(seed, "talker.pos", (4096, h), 0.5)
        self._head = _normal(seed, "talker.head", (h, dims.codec_vocab_size), 2.0 * s)
        self.placement = PLACEMENT
        self.calls = 0
        self.reset()

    @property
    def n_past(self) -> int:
        return int(self._kv.shape[0])

    @property
    def n_ctx(self) -> int | None:
        return self._n_ctx

    def reset(self) -> None:
        self._kv = np.zeros((0, 2, self.hidden_size))

    def rewind(self, n_past: int) -> None:
        if not 0 <= n_past <= self.n_past:
            raise ValueError(f"cannot rewind to {n_past}: {self.n_past} positions are cached")
        self._kv = self._kv[:n_past].copy()

    def save_state(self) -> tuple[int, np.ndarray]:
        return self.n_past, self._kv.astype(np.float64, copy=True)

    def load_state(self, state: tuple[int, np.ndarray]) -> None:
        n, kv = state
        kv = np.asarray(kv, dtype=np.float64)
        if kv.shape != (n, 2, self.hidden_size):
            raise ValueError(f"saved talker state has shape {kv.shape}, expected {(n, 2, self.hidden_size)}")
        self._kv = kv.copy()

    def prefill(self, embeds: np.ndarray) -> StepOutput:
        self.reset()
        return self.extend(embeds)

    def extend(self, embeds: np.ndarray) -> StepOutput:
        x = np.asarray(embeds, dtype=np.float32).astype(np.float64)
        if x.ndim != 2 or x.shape[0] == 0 or x.shape[1] != self.hidden_size:
            raise ValueError(f"expected embeddings of shape (n >= 1, {self.hidden_size}), got {x.shape}")
        start, n = self.n_past, x.shape[0]
        if self._n_ctx is not None and start + n > self._n_ctx:
            raise ValueError(f"{start} cached + {n} new positions exceed n_ctx {self._n_ctx}")
        # Row by row, so a batch and single steps compute exactly the same numbers.
        rows = [np.stack([np.tanh(r @ self._wk + self._pos[(start + i) % len(self._pos)]), np.tanh(r @ self._wv)])
                for i, r in enumerate(x)]
        self._kv = np.concatenate([self._kv, np.stack(rows)])
        self.calls += 1
        last = x[-1]
        keys, values = self._kv[:, 0], self._kv[:, 1]
        scores = keys @ (last @ self._wq) / np.sqrt(self.hidden_size)
        weights = np.exp(scores - scores.max())
        weights /= weights.sum()
        h = np.tanh(last @ self._wo + weights @ values)
        h = h / np.sqrt(np.mean(h * h) + 1e-6)  # "final norm"
        return StepOutput(logits=(h @ self._head).astype(np.float32), hidden=h.astype(np.float32))

    def step(self, embed: np.ndarray) -> StepOutput:
        """One position: ``extend`` of a single row (which checks its width)."""
        return self.extend(np.atleast_2d(np.asarray(embed, dtype=np.float32)))


class FakePredictor:
    """Residual codes of one frame: a recurrent state read by 15 heads, each chosen code updating it."""

    capabilities: frozenset[str] = frozenset()

    def __init__(self, dims: FakeDims = FakeDims(), seed: int = 0) -> None:
        w, h = dims.predictor_width, dims.hidden_size
        self.num_steps, self.codebook_size, self.hidden_size = dims.num_steps, dims.codebook_size, h
        self._codec_vocab_size = dims.codec_vocab_size
        self._in = _normal(seed, "predictor.in", (h, w), 1 / np.sqrt(h))
        self._c0 = _normal(seed, "predictor.c0", (dims.codec_vocab_size, w), 0.5)
        self._heads = _normal(seed, "predictor.heads", (dims.num_steps, dims.codebook_size, w), 3 / np.sqrt(w))
        self._codes = _normal(seed, "predictor.codes", (dims.num_steps, dims.codebook_size, w), 0.5)
        self.placement = PLACEMENT
        self.frames = 0

    def predict(self, past_hidden: np.ndarray, c0: int, sampling: ResidualSampling = GREEDY) -> np.ndarray:
        h = np.asarray(past_hidden, dtype=np.float32).reshape(-1)
        if h.shape[0] != self.hidden_size:
            raise ValueError(f"past_hidden must have {self.hidden_size} values, got {h.shape[0]}")
        if not 0 <= int(c0) < self._codec_vocab_size:
            raise ValueError(f"c0 must be in [0, {self._codec_vocab_size}), got {c0}")
        host = sampling.chooser is not None
        uniforms = None
        if not host and sampling.do_sample:  # like a fused graph: the frame's numbers up front
            uniforms = np.asarray(sampling.uniforms(self.num_steps), dtype=np.float64).reshape(-1)
            if uniforms.shape != (self.num_steps,):
                raise ValueError(f"expected {self.num_steps} uniforms, got {uniforms.shape}")
        state = np.tanh(h.astype(np.float64) @ self._in + self._c0[int(c0)])
        codes = np.zeros(self.num_steps, dtype=np.int64)
        for j in range(self.num_steps):
            logits = (self._heads[j] @ state).astype(np.float32)
            if host:
                c = int(sampling.chooser(j, logits))
            elif uniforms is not None:
                c = draw(float(uniforms[j]), sampling.scores(logits))
            else:
                c = int(np.argmax(logits))
            if not 0 <= c < self.codebook_size:
                raise ValueError(f"chooser returned code {c} outside [0, {self.codebook_size})")
            codes[j] = c
            state = np.tanh(state + self._codes[j, c])
        self.frames += 1
        return codes


class FakeTables:
    """Text rows made per id on demand; codec rows; the residual codebook tables."""

    def __init__(self, dims: FakeDims = FakeDims(), seed: int = 0) -> None:
        self.hidden_size = dims.hidden_size
        self.text_vocab_size, self.codec_vocab_size = dims.text_vocab_size, dims.codec_vocab_size
        self.num_steps, self.codebook_size = dims.num_steps, dims.codebook_size
        self._seed = seed
        self._text: dict[int, np.ndarray] = {}
        self._codec = _normal(seed, "tables.codec", (dims.codec_vocab_size, dims.hidden_size), 0.3).astype(np.float32)
        self._residual = _normal(seed, "tables.residual", (dims.num_steps, dims.codebook_size, dims.hidden_size),
                                 0.05).astype(np.float32)

    _ids = staticmethod(checked_ids)

    def _text_row(self, i: int) -> np.ndarray:
        row = self._text.get(i)
        if row is None:
            row = self._text[i] = (_rng(self._seed, "tables.text", i).standard_normal(self.hidden_size)
                                   * 0.3).astype(np.float32)
        return row

    def text_embeds(self, ids: Any) -> np.ndarray:
        ids = self._ids(ids, self.text_vocab_size, "text")
        out = np.zeros((ids.size, self.hidden_size), dtype=np.float32)
        for n, i in enumerate(ids.tolist()):
            out[n] = self._text_row(i)
        return out

    def codec_embeds(self, ids: Any) -> np.ndarray:
        return self._codec[self._ids(ids, self.codec_vocab_size, "codec")].copy()

    def frame_embeds(self, codes: Any) -> np.ndarray:
        c0, res = split_frame_codes(codes, self.num_steps, self.codebook_size)
        out = self.codec_embeds(c0)
        for j in range(self.num_steps):
            out += self._residual[j, res[:, j]]
        return out


class FakeDecoder:
    """Codes -> PCM, frame by frame: a tone whose pitch and loudness follow the codes, phase carried over."""

    capabilities = frozenset({DECODER_PRIMED_CACHE})

    def __init__(self, dims: FakeDims = FakeDims(), seed: int = 0, primed_voices: int = 4) -> None:
        self.num_quantizers = dims.num_steps + 1
        self.codebook_size = dims.codebook_size
        self.samples_per_frame, self.sample_rate = dims.samples_per_frame, dims.sample_rate
        self.providers = ["numpy-fake"]
        self._weights = _rng(seed, "decoder.weights").integers(1, 7, self.num_quantizers)
        self._primed: OrderedDict[bytes, tuple[float, np.ndarray, int]] = OrderedDict()
        self._primed_voices = primed_voices
        self.primes_computed = 0
        self.reset()

    def reset(self) -> None:
        self._phase, self._prev, self._frames = 0.0, np.zeros(self.num_quantizers, dtype=np.int64), 0

    @property
    def frames_decoded(self) -> int:
        return self._frames

    def _check(self, codes: np.ndarray) -> np.ndarray:
        codes = np.asarray(codes)
        if not np.issubdtype(codes.dtype, np.integer):
            raise TypeError(f"codes must be integers, got {codes.dtype}")
        if codes.ndim != 2 or codes.shape[1] != self.num_quantizers or codes.shape[0] < 1:
            raise ValueError(f"codes must have shape (N >= 1, {self.num_quantizers}), got {codes.shape}")
        if codes.min() < 0 or codes.max() >= self.codebook_size:
            raise ValueError(f"codes must lie in 0..{self.codebook_size - 1}")
        return codes.astype(np.int64)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        codes = self._check(codes)
        n = self.samples_per_frame
        t = np.arange(1, n + 1, dtype=np.float64)
        out = np.zeros(codes.shape[0] * n, dtype=np.float32)
        for i, row in enumerate(codes):
            mix = int((row * self._weights).sum() + (self._prev * self._weights[::-1]).sum())
            freq = 80.0 + (mix % 97) * 4.0
            amp = 0.05 + 0.25 * ((row[0] + self._prev[1]) % 8) / 8
            phases = self._phase + 2 * np.pi * freq * t / self.sample_rate
            out[i * n:(i + 1) * n] = amp * np.sin(phases)
            self._phase = float(phases[-1] % (2 * np.pi))
            self._prev = row
            self._frames += 1
        return out

    def prime(self, ref_codes: np.ndarray) -> None:
        codes = self._check(ref_codes)
        key = hashlib.sha256(codes.tobytes()).digest()
        if key in self._primed:
            self._primed.move_to_end(key)
            self._phase, prev, self._frames = self._primed[key]
            self._prev = prev.copy()
            return
        self.reset()
        self.decode(codes)
        self.primes_computed += 1
        self._primed[key] = (self._phase, self._prev.copy(), self._frames)
        while len(self._primed) > self._primed_voices:
            self._primed.popitem(last=False)

    def primed_state(self, ref_codes: np.ndarray) -> dict[str, np.ndarray]:
        self.prime(ref_codes)
        state = {"phase": np.array([self._phase]), "prev": self._prev.copy(), "frames": np.array([self._frames])}
        self.reset()
        return state

    def keep_primed(self, ref_codes: np.ndarray, state: dict[str, np.ndarray]) -> None:
        key = hashlib.sha256(self._check(ref_codes).tobytes()).digest()
        if set(state) != {"phase", "prev", "frames"} or np.shape(state["prev"]) != (self.num_quantizers,):
            raise ValueError("not a primed state of this decoder")
        self._primed[key] = (float(state["phase"][0]), np.asarray(state["prev"]).copy(), int(state["frames"][0]))

    def forget_primed(self) -> None:
        self._primed.clear()


def fake_generation(dims: FakeDims = FakeDims(), seed: int = 0) -> GenerationEngines:
    """A fake talker, predictor and tables of matching sizes."""
    return GenerationEngines(FakeTalker(dims, seed), FakePredictor(dims, seed), FakeTables(dims, seed))
