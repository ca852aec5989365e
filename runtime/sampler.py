"""Code sampling with the official (HF transformers 4.57) semantics, reproducible per seed.

Codebook 0 (talker): repetition penalty over the codebook-0 ids generated so far (the prompt is pure
embeddings, so nothing else counts), EOS blocked for the first ``min_new_frames`` frames, ids
``vocab-1024 .. vocab-1`` suppressed except EOS, then temperature, top-k, top-p (1.0 is a no-op) — in
the order HF applies them. Residual codebooks 1..15 (code predictor): temperature, top-k, top-p only.
Greedy mode takes the argmax of the processed logits (penalty and masks still apply, as in HF).

Codebook 0 and the residual codes draw from two independent random streams derived from one seed, so
a seed replays a run exactly whatever the backend's call pattern. Torch-free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from .checks import require_int


@dataclass(frozen=True)
class SamplingParams:
    """Sampling options; defaults are the shipped generation_config.json values."""

    do_sample: bool = True
    temperature: float = 0.9
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.05
    subtalker_dosample: bool = True
    subtalker_temperature: float = 0.9
    subtalker_top_k: int = 50
    subtalker_top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "subtalker_temperature"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and value > 0 and np.isfinite(value)):
                raise ValueError(f"{name} must be a positive number, got {value!r}")
        for name in ("top_p", "subtalker_top_p"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value <= 1):
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        for name in ("top_k", "subtalker_top_k"):
            require_int(name, getattr(self, name), note=" (0 disables it)")
        if not (isinstance(self.repetition_penalty, int | float) and self.repetition_penalty > 0):
            raise ValueError(f"repetition_penalty must be positive, got {self.repetition_penalty!r}")
        require_int("seed", self.seed, optional=True)

    @classmethod
    def from_generation_config(cls, config: Mapping[str, Any], **overrides: Any) -> SamplingParams:
        """Defaults from a checkpoint's generation_config.json, then explicit overrides (None = keep)."""
        known = {f for f in cls.__dataclass_fields__}
        values = {k: v for k, v in config.items() if k in known}
        values.update({k: v for k, v in overrides.items() if v is not None})
        unknown = set(overrides) - known
        if unknown:
            raise ValueError(f"unknown sampling options {sorted(unknown)}")
        return cls(**values)

    def greedy(self) -> SamplingParams:
        return replace(self, do_sample=False, subtalker_dosample=False)


def _top_k_top_p(scores: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    if top_k and top_k < scores.size:
        kth = np.partition(scores, -top_k)[-top_k]
        scores = np.where(scores < kth, -np.inf, scores)
    if top_p < 1.0:
        order = np.argsort(scores, kind="stable")  # ascending, like HF
        probs = _softmax(scores[order])
        remove = np.cumsum(probs) <= (1 - top_p)
        remove[-1] = False  # keep at least one token
        scores = scores.copy()
        scores[order[remove]] = -np.inf
    return scores


def _softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x)
    e = np.exp(x - m)
    return e / e.sum()


def draw(uniform: float, scores: np.ndarray) -> int:
    """Inverse-CDF draw in index order: the first id whose cumulative probability exceeds ``uniform`` in [0, 1).

    Masked ids (-inf) have probability 0 and never move the cumulative sum, so only the kept ids (top-k: 50 of
    2048) are exponentiated: the same draw as over the full softmax, for less work (bench/README, "Numbers behind
    code choices")."""
    keep = np.flatnonzero(scores > -np.inf)
    x = scores[keep].astype(np.float64)
    cdf = np.cumsum(np.exp(x - x.max()))
    idx = int(np.searchsorted(cdf, uniform * cdf[-1], side="right"))
    return int(keep[min(idx, keep.size - 1)])


def _draw(rng: np.random.Generator, scores: np.ndarray) -> int:
    return draw(rng.random(), scores)


Chooser = Callable[[int, np.ndarray], int]


@dataclass(frozen=True)
class ResidualSampling:
    """How one frame's 15 residual codes are chosen: what ``Predictor.predict`` receives (the engine contract).

    An engine that samples on its own (the fused ONNX graph) reads the parameters and takes the frame's numbers
    from ``uniforms``, the seeded residual stream; an engine that chooses on the host calls :meth:`choose`,
    which draws from the same stream, so a seed gives the same codes on every engine. ``chooser`` overrides
    both with a host callback ``(step, logits) -> code`` (parity checks, teacher forcing). The default is greedy.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    uniforms: Callable[[int], np.ndarray] | None = None  # the next n numbers in [0, 1) of the residual stream
    chooser: Chooser | None = None

    def __post_init__(self) -> None:
        if self.do_sample and self.chooser is None and self.uniforms is None:
            raise ValueError("sampled residual codes need the seeded uniform stream (uniforms=...)")

    @classmethod
    def host(cls, chooser: Chooser) -> ResidualSampling:
        """Every code chosen by ``chooser(step, logits)`` on the host."""
        return cls(chooser=chooser)

    def scores(self, logits: np.ndarray) -> np.ndarray:
        """The processed scores a residual code is drawn from (temperature, top-k, top-p when sampling)."""
        scores = np.asarray(logits, dtype=np.float32)
        if self.do_sample:
            if self.temperature != 1.0:
                scores = scores / np.float32(self.temperature)
            scores = _top_k_top_p(scores, self.top_k, self.top_p)
        return scores

    def choose(self, step: int, logits: np.ndarray) -> int:
        """The code of residual step ``step`` from its head's ``logits`` (host engines)."""
        if self.chooser is not None:
            return int(self.chooser(step, logits))
        if not self.do_sample:
            return int(np.argmax(logits))
        return draw(float(self.uniforms(1)[0]), self.scores(logits))


GREEDY = ResidualSampling()


class CodeSampler:
    """Chooses codebook-0 ids for the talker and residual ids for the code predictor of one utterance."""

    def __init__(self, params: SamplingParams, *, vocab_size: int, eos_id: int, min_new_frames: int = 2):
        self.params = params
        self.eos_id = eos_id
        self.min_new_frames = min_new_frames
        self.suppress = np.array([i for i in range(vocab_size - 1024, vocab_size) if i != eos_id], dtype=np.int64)
        seq = np.random.SeedSequence(params.seed)  # None -> fresh OS entropy
        c0_seed, res_seed = seq.spawn(2)
        self._rng0 = np.random.Generator(np.random.Philox(c0_seed))
        self._rng_res = np.random.Generator(np.random.Philox(res_seed))
        self._residual = ResidualSampling(do_sample=params.subtalker_dosample, temperature=params.subtalker_temperature,
                                          top_k=params.subtalker_top_k, top_p=params.subtalker_top_p,
                                          uniforms=self._rng_res.random)
        self.generated: list[int] = []

    def process_c0(self, logits: np.ndarray, frame: int) -> np.ndarray:
        """The processed codebook-0 scores HF would sample from at ``frame`` (0-based)."""
        p = self.params
        scores = np.array(logits, dtype=np.float32, copy=True)
        if p.repetition_penalty != 1.0 and self.generated:
            seen = np.unique(np.asarray(self.generated, dtype=np.int64))
            s = scores[seen]
            scores[seen] = np.where(s < 0, s * p.repetition_penalty, s / p.repetition_penalty)
        if frame < self.min_new_frames:
            scores[self.eos_id] = -np.inf
        scores[self.suppress] = -np.inf
        if p.do_sample:
            if p.temperature != 1.0:
                scores = scores / np.float32(p.temperature)
            scores = _top_k_top_p(scores, p.top_k, p.top_p)
        return scores

    def choose_c0(self, logits: np.ndarray, frame: int) -> int:
        """Pick codebook 0 of ``frame`` and remember it for the repetition penalty."""
        scores = self.process_c0(logits, frame)
        code = _draw(self._rng0, scores) if self.params.do_sample else int(np.argmax(scores))
        self.generated.append(code)
        return code

    def residual_sampling(self) -> ResidualSampling:
        """This utterance's residual-code rule for the code predictor: its parameters and seeded stream."""
        return self._residual

    def process_residual(self, logits: np.ndarray) -> np.ndarray:
        return self._residual.scores(logits)

    def residual_uniforms(self, n: int) -> np.ndarray:
        """The next ``n`` numbers of the residual stream: what ``n`` sampled ``choose_residual`` calls consume.

        An engine that samples inside its own graph (the fused ONNX predictor) draws a frame's 15 numbers up
        front, so a seed replays the same codes whichever engine runs (``Generator.random(n)`` yields the same
        numbers as ``n`` calls)."""
        return self._rng_res.random(n)

    def choose_residual(self, step: int, logits: np.ndarray) -> int:
        """Pick residual codebook ``step + 1`` (the code predictor's ``choose`` callback)."""
        scores = self.process_residual(logits)
        return _draw(self._rng_res, scores) if self.params.subtalker_dosample else int(np.argmax(scores))
