"""The pipecat TTS service in real pipecat pipelines (``Pipeline`` run by a ``PipelineWorker`` on a ``WorkerRunner``,
pipecat 1.x's names for ``PipelineTask`` and ``PipelineRunner``), and pipecat's own ``OpenAITTSService`` against a
real ``serve`` process on loopback.

An LLM is played by a source that queues ``LLMTextFrame``s token by token at a chat model's pace; a sink at the
end of the pipeline records every frame with its arrival. The tiny random bundle speaks noise, so utterance lengths
are pinned (``min_frames`` = ``max_frames``) and equality is checked for greedy decoding.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import needs_export

pytest.importorskip("pipecat")
pytestmark = needs_export

from loguru import logger  # noqa: E402  (pipecat's logger)
from pipecat.frames.frames import (  # noqa: E402
    EndFrame,
    ErrorFrame,
    InterruptionFrame,
    LLMFullResponseEndFrame,
    LLMFullResponseStartFrame,
    LLMTextFrame,
    TTSAudioRawFrame,
    TTSSpeakFrame,
    TTSStartedFrame,
    TTSStoppedFrame,
)
from pipecat.pipeline.pipeline import Pipeline  # noqa: E402
from pipecat.pipeline.worker import PipelineParams, PipelineWorker  # noqa: E402
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor  # noqa: E402
from pipecat.workers.runner import WorkerRunner  # noqa: E402

from qwen3_tts_edge.runtime.agents.pipecat_tts import Qwen3TTSService, TextAggregationMode  # noqa: E402
from qwen3_tts_edge.runtime.audio import to_s16le  # noqa: E402
from qwen3_tts_edge.runtime.options import SpeakOptions  # noqa: E402

logger.remove()  # pipecat logs every frame at debug level
logger.add(sys.stderr, level="WARNING")

TEXT = "Streaming text from a language model is read aloud. It goes on while the model is still writing."
FIRST_SENTENCE_TOKENS = len(re.findall(r"\s*\S+", TEXT.split(".")[0] + "."))
SAY = dict(speaker="ryan", greedy=True, min_frames=60, max_frames=60)  # 60 frames: longer than the text's tokens
# A request that would run for a long time: no end of speech before 1500 frames, no runaway guard.
ENDLESS = dict(speaker="ryan", seed=1, min_frames=1500, max_frames=1500, frames_per_text_token=None,
               chunk_frames=(1,))
TOKEN_PACE_S = 0.02  # a chat model's pace: ~50 tokens a second


def tokens(text: str) -> list[str]:
    """Text as an LLM streams it: words with their leading spaces."""
    return re.findall(r"\s*\S+", text)


@pytest.fixture(scope="module")
def tts(tiny_bundle):
    from qwen3_tts_edge.runtime.pipeline import TTS

    return TTS(tiny_bundle, talker_precision="f32")


class Sink(FrameProcessor):
    """The end of the pipeline: every downstream frame with its arrival time."""

    def __init__(self):
        super().__init__()
        self.frames: list[tuple[float, object]] = []
        self.audio_arrived = asyncio.Event()

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if direction == FrameDirection.DOWNSTREAM:
            self.frames.append((time.perf_counter(), frame))
            if isinstance(frame, TTSAudioRawFrame):
                self.audio_arrived.set()
        await self.push_frame(frame, direction)

    def audio(self, context_id: str | None = None) -> list[TTSAudioRawFrame]:
        return [f for _, f in self.frames if isinstance(f, TTSAudioRawFrame)
                and (context_id is None or f.context_id == context_id)]

    def of(self, kind: type) -> list:
        return [f for _, f in self.frames if isinstance(f, kind)]


class Source(FrameProcessor):
    """The start of the pipeline: keeps the errors processors report upstream."""

    def __init__(self):
        super().__init__()
        self.errors: list[ErrorFrame] = []

    async def process_frame(self, frame, direction):
        await super().process_frame(frame, direction)
        if isinstance(frame, ErrorFrame):
            self.errors.append(frame)
        await self.push_frame(frame, direction)


class Run:
    """A pipeline source -> service -> sink on a running ``WorkerRunner``; ``await run.say(...)`` plays an LLM."""

    def __init__(self, service, rate: int = 24000):
        self.source, self.sink = Source(), Sink()
        self.worker = PipelineWorker(Pipeline([self.source, service, self.sink]),
                                     params=PipelineParams(audio_out_sample_rate=rate))
        self.runner = WorkerRunner(handle_sigint=False)
        self.pushed = 0  # tokens queued so far

    async def __aenter__(self) -> Run:
        await self.runner.add_workers(self.worker)
        self.task = asyncio.create_task(self.runner.run())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.worker.queue_frame(EndFrame())
        await asyncio.wait_for(self.task, 60)

    async def token(self, piece: str) -> None:
        await self.worker.queue_frame(LLMTextFrame(piece))
        self.pushed += 1
        await asyncio.sleep(TOKEN_PACE_S)

    async def say(self, text: str, *, end: bool = True) -> None:
        await self.worker.queue_frame(LLMFullResponseStartFrame())
        for piece in tokens(text):
            await self.token(piece)
        if end:
            await self.worker.queue_frame(LLMFullResponseEndFrame())


def pcm16(chunks) -> bytes:
    return b"".join(to_s16le(c.pcm) for c in chunks)


def test_token_stream_is_one_utterance_whose_audio_starts_after_the_first_words(tts):
    want = pcm16(tts.stream(TEXT, **SAY))
    service = Qwen3TTSService(engine=tts, options=SpeakOptions(**SAY))
    assert service._text_aggregation_mode == TextAggregationMode.TOKEN  # the default

    async def main():
        async with Run(service) as run:
            await run.worker.queue_frame(LLMFullResponseStartFrame())
            pieces = tokens(TEXT)
            for piece in pieces[:4]:
                await run.token(piece)
            # The LLM pauses mid-sentence: audio must come from the words so far (a sentence-buffering TTS would
            # wait here for the full stop that has not been written).
            await asyncio.wait_for(run.sink.audio_arrived.wait(), 60)
            pushed_at_first_audio = run.pushed
            for piece in pieces[4:]:
                await run.token(piece)
            await run.worker.queue_frame(LLMFullResponseEndFrame())
        return run, pushed_at_first_audio

    run, pushed_at_first_audio = asyncio.run(main())
    assert pushed_at_first_audio == 4 < FIRST_SENTENCE_TOKENS
    audio = run.sink.audio()
    assert b"".join(f.audio for f in audio) == want  # the whole text's audio: one utterance, same codes
    assert {f.sample_rate for f in audio} == {24000} and {f.num_channels for f in audio} == {1}
    assert len(run.sink.of(TTSStartedFrame)) == 1 and len(run.sink.of(TTSStoppedFrame)) == 1
    assert len({f.context_id for f in audio}) == 1
    assert run.source.errors == []


def test_sentences_feed_the_same_utterance(tts):
    """Sentence aggregation waits for each sentence, then continues the same request (with the space pipecat's
    aggregator strips between sentences put back): the audio is still the whole text's."""
    want = pcm16(tts.stream(TEXT, **SAY))

    async def main():
        service = Qwen3TTSService(engine=tts, options=SpeakOptions(**SAY),
                                  text_aggregation_mode=TextAggregationMode.SENTENCE)
        async with Run(service) as run:
            await run.say(TEXT)
        return run

    run = asyncio.run(main())
    assert b"".join(f.audio for f in run.sink.audio()) == want
    assert run.source.errors == []


def test_audio_is_resampled_to_the_pipeline_rate(tts):
    import soxr

    whole = np.concatenate([c.pcm for c in tts.stream(TEXT, **SAY)])

    async def main():
        async with Run(Qwen3TTSService(engine=tts, options=SpeakOptions(**SAY)), rate=16000) as run:
            await run.say(TEXT)
        return run

    run = asyncio.run(main())
    audio = run.sink.audio()
    assert {f.sample_rate for f in audio} == {16000}
    got = np.frombuffer(b"".join(f.audio for f in audio), np.int16).astype(np.float32) / 32767
    ref = soxr.resample(whole, 24000, 16000)
    assert abs(len(got) - len(ref)) <= 2 and len(got) == pytest.approx(len(whole) * 2 / 3, abs=2)
    n = min(len(got), len(ref))
    assert np.corrcoef(got[:n], ref[:n])[0, 1] > 0.999  # the same signal, not a nearest-sample decimation


def test_interruption_stops_the_audio_and_the_next_turn_speaks_fresh(tts):
    opts = SpeakOptions(**ENDLESS)
    second = "A new answer after the interruption."

    async def main():
        service = Qwen3TTSService(engine=tts, options=opts)
        async with Run(service) as run:
            await run.say(TEXT, end=False)  # the LLM is still writing when the user barges in
            while len(run.sink.audio()) < 3:
                await asyncio.sleep(0.01)
            interrupted = tts.last_stats
            frames_at_interruption = interrupted.frames
            await run.worker.queue_frame(InterruptionFrame())
            await asyncio.sleep(0.5)  # generation would make dozens of frames in this time
            frames_after = interrupted.frames
            await run.say(second)
            while len(run.sink.audio()) < len(run.sink.audio(run.sink.audio()[0].context_id)) + 8:
                await asyncio.sleep(0.01)
            await run.worker.queue_frame(InterruptionFrame())  # the endless second turn ends here too
        return run, interrupted, frames_at_interruption, frames_after

    run, interrupted, frames_at_interruption, frames_after = asyncio.run(main())
    assert interrupted.stop_reason == "cancelled"
    assert frames_after - frames_at_interruption <= 2  # generation stopped within two frames
    kinds = [(type(f).__name__, getattr(f, "context_id", None)) for _, f in run.sink.frames]
    first_ctx = run.sink.audio()[0].context_id
    cut = kinds.index(("InterruptionFrame", None))
    assert all(ctx != first_ctx for name, ctx in kinds[cut:] if name == "TTSAudioRawFrame")  # no stale audio
    later = [f for f in run.sink.audio() if f.context_id != first_ctx]
    new_ctx = later[0].context_id
    assert all(f.context_id == new_ctx for f in later[:8])
    # the new turn starts from a clean decoder: its audio is what the engine makes of that text alone
    with tts.stream(second, opts) as stream:
        fresh = pcm16(itertools.islice(stream, 8))
    assert b"".join(f.audio for f in later[:8]) == fresh
    assert run.source.errors == []


def test_voice_language_and_bad_settings(tts, tmp_path):
    svc = Qwen3TTSService(engine=tts, settings=Qwen3TTSService.Settings(voice="Vivian", language="en-US"))
    assert svc._request_options().speaker == "vivian" and svc._request_options().language == "english"
    with pytest.raises(ValueError, match=r"unknown voice 'nobody'.*ryan"):
        Qwen3TTSService(engine=tts, settings=Qwen3TTSService.Settings(voice="nobody"))
    with pytest.raises(ValueError, match="does not exist"):
        Qwen3TTSService(engine=tts, settings=Qwen3TTSService.Settings(voice=str(tmp_path / "me.voice")))
    with pytest.raises(TypeError, match="either engine="):
        Qwen3TTSService("some/bundle", engine=tts)
    with pytest.raises(TypeError, match="needs a bundle"):
        Qwen3TTSService()


def test_a_request_error_is_reported_once_per_turn(tts):
    """A setting the bundle cannot take (instruct on a 0.6B CustomVoice) is one ErrorFrame for the turn, not one per
    token, and no audio."""
    async def main():
        service = Qwen3TTSService(engine=tts, options=SpeakOptions(**SAY),
                                  settings=Qwen3TTSService.Settings(instruct="A calm voice."))
        async with Run(service) as run:
            await run.say(TEXT)
        return run

    run = asyncio.run(main())
    ours = [e.error for e in run.source.errors if "instruct" in e.error]
    assert len(ours) == 1 and "does not support instruct" in ours[0]
    assert all("completed with no audio" in e.error for e in run.source.errors if e.error not in ours)  # pipecat's
    assert run.sink.audio() == []


def test_lean_install_imports_no_framework():
    code = ("import sys\nimport qwen3_tts_edge.runtime, qwen3_tts_edge.runtime.agents\n"
            "print(sorted(m for m in ('pipecat', 'livekit') if m in sys.modules))\n"
            "sys.modules['pipecat'] = None\n"
            "try:\n    import qwen3_tts_edge.runtime.agents.pipecat_tts\nexcept ImportError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.splitlines() == ["[]", "the pipecat TTS service needs pipecat-ai: pip install "
                                "'qwen3-tts-edge[pipecat]'"]


def test_pipecats_openai_service_speaks_through_serve_with_its_default_voice(tiny_bundle):
    """pipecat's OpenAITTSService refuses voices outside OpenAI's list and defaults to 'alloy'; serve's default
    aliases map that name to a preset speaker, so the stock service speaks."""
    pytest.importorskip("fastapi")
    from pipecat.services.openai.tts import OpenAITTSService
    from test_server_cli import EXE, _free_port, _stop, _wait_for

    port = _free_port()
    proc = subprocess.Popen([EXE, "serve", "-b", str(tiny_bundle), "--port", str(port), "--threads", "1",
                             "--max-frames", "12"], stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(proc, r"Uvicorn running on")

        async def main():
            service = OpenAITTSService(api_key="unused", base_url=f"http://127.0.0.1:{port}/v1")
            async with Run(service) as run:
                await run.worker.queue_frame(TTSSpeakFrame("Hello from pipecat."))
                await asyncio.wait_for(run.sink.audio_arrived.wait(), 60)
            return run, service._settings.voice

        run, voice = asyncio.run(main())
    finally:
        _stop(proc)
    assert voice == "alloy" and run.source.errors == []
    audio = b"".join(f.audio for f in run.sink.audio())
    assert 0 < len(audio) <= 12 * 3840  # pcm at 24 kHz, capped by --max-frames


def test_bench_measures_first_audio_in_both_modes(tiny_bundle, tmp_path):
    """``bench/agents.py`` end to end on the tiny bundle: a report with both modes, every reply interrupted and
    stopped, no audio after an interruption (the speed itself is bench's business, not asserted here)."""
    import json

    from qwen3_tts_edge.bench.agents import main

    out = tmp_path / "agents.json"
    assert main(["--framework", "pipecat", "-b", str(tiny_bundle), "--runs", "1", "--token-ms", "5",
                 "--talker-precision", "f32", "--json", str(out), "--markdown", str(tmp_path / "agents.md")]) == 0
    r = json.loads(out.read_text())["results"]["pipecat"]
    assert len(r["runs"]["token"]) == len(r["runs"]["sentence"]) == 1
    assert r["interruption"]["stop_reasons"] == ["cancelled"] and r["interruption"]["stale_audio_frames"] == 0
    assert r["token_over_sentence"] > 0 and "| pipecat |" in (tmp_path / "agents.md").read_text()
