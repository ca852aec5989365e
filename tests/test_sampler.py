"""Sampler semantics equal HF transformers' logits processors (the official generate) and replay per seed."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import needs_export
from qwen3_tts_edge.runtime.sampler import CodeSampler, SamplingParams

EOS, VOCAB = 2150, 3072


def _logits(rng, n=VOCAB):
    x = rng.standard_normal(n).astype(np.float32) * 3
    x[rng.integers(0, n, 20)] *= -1  # negative and positive logits both get penalised
    return x


@needs_export
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(top_p=0.8, top_k=20, temperature=0.7,
                                                                     repetition_penalty=1.3),
                                    SamplingParams(top_k=0, top_p=0.95), SamplingParams().greedy()])
def test_codebook0_processing_equals_hf(params):
    import torch
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinNewTokensLengthLogitsProcessor,
        RepetitionPenaltyLogitsProcessor,
        SuppressTokensLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = [RepetitionPenaltyLogitsProcessor(params.repetition_penalty),
             MinNewTokensLengthLogitsProcessor(0, 2, torch.tensor([EOS])),
             SuppressTokensLogitsProcessor([i for i in range(VOCAB - 1024, VOCAB) if i != EOS])]
    if params.do_sample:
        procs.append(TemperatureLogitsWarper(params.temperature))
        if params.top_k:
            procs.append(TopKLogitsWarper(params.top_k))
        if params.top_p < 1:
            procs.append(TopPLogitsWarper(params.top_p))
    hf = LogitsProcessorList(procs)
    sampler = CodeSampler(params, vocab_size=VOCAB, eos_id=EOS)
    rng = np.random.default_rng(1)
    history: list[int] = []
    for frame in range(6):
        logits = _logits(rng)
        ours = sampler.process_c0(logits, frame)
        ref = hf(torch.tensor([history], dtype=torch.long), torch.from_numpy(logits)[None])[0].numpy()
        assert np.array_equal(np.isinf(ours), np.isinf(ref))
        finite = np.isfinite(ref)
        np.testing.assert_allclose(ours[finite], ref[finite], rtol=1e-6, atol=1e-6)
        if frame < 2:
            assert ours[EOS] == -np.inf  # EOS blocked for the first two frames
        code = sampler.choose_c0(logits, frame)
        assert np.isfinite(ours[code]) and not (2048 <= code < VOCAB and code != EOS)
        history.append(code)


@needs_export
def test_residual_processing_equals_hf():
    import torch
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper

    params = SamplingParams()
    sampler = CodeSampler(params, vocab_size=VOCAB, eos_id=EOS)
    logits = _logits(np.random.default_rng(2), 2048)
    ref = TopKLogitsWarper(50)(None, TemperatureLogitsWarper(0.9)(None, torch.from_numpy(logits)[None]))[0].numpy()
    ours = sampler.process_residual(logits)
    assert np.array_equal(np.isinf(ours), np.isinf(ref))
    np.testing.assert_allclose(ours[np.isfinite(ref)], ref[np.isfinite(ref)], rtol=1e-6)


def _run(params, frames=30):
    s = CodeSampler(params, vocab_size=VOCAB, eos_id=EOS)
    rng = np.random.default_rng(3)
    out = []
    for f in range(frames):
        out.append(s.choose_c0(_logits(rng), f))
        out.extend(s.choose_residual(j, _logits(rng, 2048)) for j in range(15))
    return out


def test_seed_replays_exactly_and_streams_are_independent():
    a, b = _run(SamplingParams(seed=42)), _run(SamplingParams(seed=42))
    assert a == b
    assert a != _run(SamplingParams(seed=43))
    # Changing how the residual codes are sampled must not change codebook 0's random stream.
    s1 = CodeSampler(SamplingParams(seed=5), vocab_size=VOCAB, eos_id=EOS)
    s2 = CodeSampler(SamplingParams(seed=5, subtalker_dosample=False), vocab_size=VOCAB, eos_id=EOS)
    rng = np.random.default_rng(9)
    for f in range(10):
        logits = _logits(rng)
        s2.choose_residual(0, _logits(rng, 2048))
        assert s1.choose_c0(logits, f) == s2.choose_c0(logits, f)


def test_sampling_follows_the_distribution():
    """Frequencies over many draws match softmax(processed scores) (chi-square-free: max abs error)."""
    s = CodeSampler(SamplingParams(seed=0, top_k=5, repetition_penalty=1.0), vocab_size=VOCAB, eos_id=EOS)
    logits = np.full(VOCAB, -5.0, np.float32)
    logits[:5] = [2.0, 1.5, 1.0, 0.5, 0.0]
    counts = np.zeros(VOCAB)
    for _ in range(20000):
        counts[s.choose_c0(logits, frame=5)] += 1
        s.generated.clear()
    expected = np.exp(logits[:5] / 0.9) / np.exp(logits[:5] / 0.9).sum()
    assert counts[5:].sum() == 0
    assert np.max(np.abs(counts[:5] / 20000 - expected)) < 0.015


def test_greedy_takes_argmax_after_penalty_and_masks():
    s = CodeSampler(SamplingParams().greedy(), vocab_size=VOCAB, eos_id=EOS)
    logits = np.zeros(VOCAB, np.float32)
    logits[EOS], logits[3000], logits[7] = 9.0, 10.0, 1.0
    assert s.choose_c0(logits, 0) == 7  # EOS blocked on frame 0, 3000 suppressed
    assert s.choose_c0(logits, 2) == EOS  # allowed from frame 2


@pytest.mark.parametrize("bad", [dict(temperature=0), dict(top_p=1.5), dict(top_k=-1), dict(seed=-3),
                                 dict(repetition_penalty=0), dict(subtalker_temperature=float("nan"))])
def test_bad_params_are_clear_errors(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        SamplingParams(**bad)


def test_from_generation_config():
    p = SamplingParams.from_generation_config({"temperature": 0.7, "max_new_tokens": 8192, "top_k": 30},
                                              top_k=10, seed=None)
    assert (p.temperature, p.top_k, p.seed) == (0.7, 10, None)
    with pytest.raises(ValueError, match="unknown sampling options"):
        SamplingParams.from_generation_config({}, tempreature=0.5)
