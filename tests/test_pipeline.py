"""The streaming pipeline: stream == offline decode, chunk schedule, back-pressure, cancellation, errors.

Generation runs on the official PyTorch modules behind the backend protocol (the llama.cpp engines are
tested on their own); decoding uses the bundle's real stateful ONNX decoder.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from conftest import needs_export
from qwen3_tts_edge.runtime.engine import EngineConfig, GenerationEngines
from qwen3_tts_edge.runtime.pipeline import TTS, SpeakOptions

pytestmark = needs_export
TEXT = "Streaming speech, one frame at a time, without seams."


class CountingPredictor:
    """Wraps a predictor to count frames generated (and optionally fail), to observe the worker thread."""

    capabilities = frozenset()

    def __init__(self, inner, fail_at: int | None = None):
        self.inner, self.fail_at, self.calls = inner, fail_at, 0
        self.placement = inner.placement

    def predict(self, past_hidden, c0, sampling):
        self.calls += 1
        if self.fail_at is not None and self.calls > self.fail_at:
            raise RuntimeError("simulated engine failure")
        return self.inner.predict(past_hidden, c0, sampling)


@pytest.fixture(scope="module")
def parts(tiny_checkpoint):
    import torch

    from qwen3_tts_edge.export.torch_reference import TorchPredictor, TorchTables, TorchTalker, load_official

    torch.set_num_threads(1)
    model = load_official(tiny_checkpoint)
    return model, TorchTalker(model), TorchPredictor(model), TorchTables(model)


def _tts(tiny_bundle, parts, predictor=None, **kw):
    model, talker, pred, tables = parts
    return TTS.from_engines(GenerationEngines(talker, predictor or pred, tables), tiny_bundle, name="torch-fp32",
                            config=EngineConfig(**kw))


def test_stream_equals_offline_decode_of_the_same_codes(tiny_bundle, parts):
    import torch

    tts = _tts(tiny_bundle, parts)
    chunks = list(tts.stream(TEXT, speaker="vivian", seed=3, max_frames=40, chunk_frames=(1, 2, 4, 8)))
    assert [c.n_frames for c in chunks[:-1]] == [1, 2, 4, 8, 8, 8, 8] and chunks[-1].final
    assert chunks[-1].stop_reason == "max_frames" and sum(c.n_frames for c in chunks) == 40
    pcm = np.concatenate([c.pcm for c in chunks])
    codes = np.concatenate([c.codes for c in chunks])
    assert pcm.shape == (40 * 1920,) and codes.shape == (40, 16)
    with torch.no_grad():  # official decoder, whole sequence at once
        ref = parts[0].speech_tokenizer.model.decoder(torch.from_numpy(codes.T[None])).reshape(-1).numpy()
    assert np.max(np.abs(pcm - ref)) <= 1e-4
    assert [c.first_frame for c in chunks] == list(np.cumsum([0] + [c.n_frames for c in chunks[:-1]]))
    stats = tts.last_stats
    assert stats.frames == 40 and stats.ttfa_s is not None and stats.ttfa_s <= chunks[0].elapsed_s + 1e-9
    assert abs(stats.audio_s - 40 * 0.08) < 1e-9 and stats.rtf > 0
    stages = stats.per_frame_ms()
    assert set(stages) == {"talker", "predictor", "decoder", "host"}
    # host work is measured inside the loop (not a residual): positive, and a part of the generation wall time
    assert stages["host"] > 0 and stats.host_ms < stats.total_s * 1e3


def test_seed_replays_the_same_audio(tiny_bundle, parts):
    tts = _tts(tiny_bundle, parts)
    a, _ = tts.synthesize(TEXT, speaker="vivian", seed=5, max_frames=12)
    b, _ = tts.synthesize(TEXT, speaker="vivian", seed=5, max_frames=12)
    c, sr = tts.synthesize(TEXT, speaker="vivian", seed=6, max_frames=12)
    assert sr == 24000 and np.array_equal(a, b) and not np.array_equal(a, c)


def test_slow_consumer_gets_back_pressure(tiny_bundle, parts):
    pred = CountingPredictor(parts[2])
    tts = _tts(tiny_bundle, parts, predictor=pred, max_queued_frames=3)
    stream = tts.stream(TEXT, speaker="vivian", seed=1, max_frames=200, chunk_frames=(1,))
    next(stream)  # one frame consumed
    time.sleep(1.5)  # the generator could make dozens of frames in this time
    assert pred.calls <= 1 + 3 + 1  # consumed + queue bound + the one waiting to be queued
    stream.close()


def test_closing_the_stream_stops_generation_promptly(tiny_bundle, parts):
    pred = CountingPredictor(parts[2])
    tts = _tts(tiny_bundle, parts, predictor=pred)
    before = threading.active_count()
    stream = tts.stream(TEXT, speaker="vivian", seed=1, max_frames=5000, chunk_frames=(1,))
    next(stream)
    t = time.perf_counter()
    stream.close()
    assert time.perf_counter() - t < 2.0
    assert threading.active_count() == before
    calls = pred.calls
    time.sleep(0.3)
    assert pred.calls == calls < 100  # nothing runs after close
    assert tts.last_stats.stop_reason == "cancelled"


def test_engine_failure_surfaces_in_the_consumer(tiny_bundle, parts):
    tts = _tts(tiny_bundle, parts, predictor=CountingPredictor(parts[2], fail_at=3))
    with pytest.raises(RuntimeError, match="simulated engine failure"):
        list(tts.stream(TEXT, speaker="vivian", seed=1, max_frames=50, chunk_frames=(1,)))


def test_incremental_text_through_the_pipeline(tiny_bundle, parts):
    def words():
        for w in TEXT.split(" "):
            time.sleep(0.02)
            yield w + " "

    tts = _tts(tiny_bundle, parts)
    chunks = list(tts.stream(words(), speaker="vivian", seed=2, max_frames=60))
    assert sum(c.n_frames for c in chunks) == 60


def test_bad_options_are_clear_errors(tiny_bundle, parts):
    tts = _tts(tiny_bundle, parts)
    with pytest.raises(ValueError, match="chunk_frames"):
        SpeakOptions(chunk_frames=(0,))
    with pytest.raises(ValueError, match="unknown speaker"):
        tts.stream(TEXT, speaker="nobody")
    with pytest.raises(ValueError, match="max_queued_frames"):
        _tts(tiny_bundle, parts, max_queued_frames=0)
    with pytest.raises(ValueError, match="temperature must be a positive number"):
        tts.stream(TEXT, speaker="vivian", temperature=-1.0)


def test_each_request_carries_its_own_stats(tiny_bundle, parts):
    """Two requests made before either runs: each stream's stats describe that request only."""
    tts = _tts(tiny_bundle, parts)
    a = tts.stream(TEXT, speaker="vivian", seed=1, max_frames=6)
    b = tts.stream(TEXT, speaker="vivian", seed=1, max_frames=9)
    assert a.stats is not b.stats and a.stats.frames == b.stats.frames == 0  # lazy: nothing ran yet
    with b:
        assert sum(c.n_frames for c in b) == 9
    assert sum(c.n_frames for c in a) == 6
    assert (a.stats.frames, b.stats.frames) == (6, 9)
    assert a.stats.stop_reason == b.stats.stop_reason == "max_frames"
    assert tts.last_stats is a.stats  # the request that ran last
