"""Voice-agent frameworks: time to first audio from the LLM's first token, sentence vs token-level text, and how
fast an interruption stops the audio.

A played LLM reply (``REPLY``) is streamed word by word at ``--token-ms`` into the framework's TTS plugin on one
shared engine; first audio is the first audio frame that leaves the plugin. Each run is one reply; modes alternate
run by run so both see the same machine load, and a warm-up reply fills the voice's prompt cache first. After first
audio each reply is interrupted the framework's way: the report counts the frames generation made after it, the
time until the request had stopped, and any audio that still came out.

``FRAMEWORKS`` maps a framework's name to its measuring coroutine ``(engine, args) -> result dict``; each imports
its framework itself (one extra per framework)::

    python -m qwen3_tts_edge.bench.agents --framework pipecat -b artifacts/agents06 --runs 5 \\
        --json bench/results/agents-0.6b.json --markdown bench/results/agents-0.6b.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from ..runtime.aio import AsyncTTS
from ..runtime.engine.config import EngineConfig, add_engine_arguments
from ..runtime.options import SpeakOptions
from ..runtime.pipeline import TTS
from . import machine

# A reply whose first sentence takes a while to write: what sentence buffering waits for.
REPLY = ("Sure, I can help you plan the trip to the coast this weekend, starting with the weather and the roads. "
         "Saturday looks sunny and calm, so leave early to miss the traffic.")
FRAME_MS = 80


def words(text: str) -> list[str]:
    """Text as an LLM streams it: words with their leading spaces."""
    return re.findall(r"\s*\S+", text)


def first_sentence_words(text: str) -> int:
    return len(words(text[: text.index(".") + 1]))


async def measure_pipecat(engine: AsyncTTS, args: argparse.Namespace) -> dict[str, Any]:
    """pipecat 1.x: ``Qwen3TTSService`` in a ``Pipeline`` on a ``PipelineWorker`` / ``WorkerRunner``, the reply as
    ``LLMTextFrame``s; interrupted with an ``InterruptionFrame``."""
    from loguru import logger
    from pipecat.frames.frames import (
        EndFrame,
        InterruptionFrame,
        LLMFullResponseEndFrame,
        LLMFullResponseStartFrame,
        LLMTextFrame,
        TTSAudioRawFrame,
    )
    from pipecat.pipeline.pipeline import Pipeline
    from pipecat.pipeline.worker import PipelineParams, PipelineWorker
    from pipecat.processors.frame_processor import FrameDirection, FrameProcessor
    from pipecat.workers.runner import WorkerRunner

    from ..runtime.agents.pipecat_tts import Qwen3TTSService, TextAggregationMode

    logger.remove()  # pipecat logs every frame

    class Sink(FrameProcessor):
        def __init__(self):
            super().__init__()
            self.first_audio: float | None = None
            self.interrupted_at: float | None = None
            self.audio_after_interruption = 0

        async def process_frame(self, frame, direction):
            await super().process_frame(frame, direction)
            if direction == FrameDirection.DOWNSTREAM:
                if isinstance(frame, TTSAudioRawFrame):
                    if self.first_audio is None:
                        self.first_audio = time.perf_counter()
                    if self.interrupted_at is not None:
                        self.audio_after_interruption += 1
                elif isinstance(frame, InterruptionFrame):
                    self.interrupted_at = time.perf_counter()
            await self.push_frame(frame, direction)

    options = SpeakOptions(speaker=args.speaker, seed=1, min_frames=100)  # noise weights: no early end of speech
    modes = {"token": TextAggregationMode.TOKEN, "sentence": TextAggregationMode.SENTENCE}

    async def reply(mode: str) -> dict[str, float]:
        sink = Sink()
        service = Qwen3TTSService(engine=engine, options=options, text_aggregation_mode=modes[mode])
        worker = PipelineWorker(Pipeline([service, sink]), params=PipelineParams(audio_out_sample_rate=24000))
        runner = WorkerRunner(handle_sigint=False)
        await runner.add_workers(worker)
        running = asyncio.create_task(runner.run())
        await asyncio.sleep(0.2)  # the StartFrame's way through
        await worker.queue_frame(LLMFullResponseStartFrame())
        pieces = words(REPLY)
        t0 = time.perf_counter()
        sentence_typed = None
        for i, piece in enumerate(pieces):
            await worker.queue_frame(LLMTextFrame(piece))
            if i + 1 == first_sentence_words(REPLY):
                sentence_typed = time.perf_counter()
            await asyncio.sleep(args.token_ms / 1000)
        await worker.queue_frame(LLMFullResponseEndFrame())
        while sink.first_audio is None:
            await asyncio.sleep(0.005)
        stats = engine.tts.last_stats
        frames_then = stats.frames
        t_int = time.perf_counter()
        await worker.queue_frame(InterruptionFrame())
        while stats.stop_reason is None:
            await asyncio.sleep(0.002)
        stopped = time.perf_counter()
        await asyncio.sleep(0.5)  # any stale audio would arrive here
        await worker.queue_frame(EndFrame())
        await running
        return {"first_audio_ms": (sink.first_audio - t0) * 1e3, "first_sentence_typed_ms": (sentence_typed - t0) * 1e3,
                "stop_ms": (stopped - t_int) * 1e3, "frames_after_interruption": stats.frames - frames_then,
                "stop_reason": stats.stop_reason, "audio_frames_after_interruption": sink.audio_after_interruption}

    await reply("token")  # warm-up: the voice's prompt prefix cache, the decoder's first run
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    for _ in range(args.runs):
        for mode in modes:
            runs[mode].append(await reply(mode))
    return summarize(runs)


async def measure_livekit(engine: AsyncTTS, args: argparse.Namespace) -> dict[str, Any]:
    """LiveKit Agents 1.8: the plugin in an ``AgentSession`` (no room: a sink takes the room's audio output), the
    reply said as an async token stream. Token-level is the plugin as it is (it streams, so LiveKit feeds it the
    tokens); sentence is the same plugin declared non-streaming, which LiveKit wraps in its ``StreamAdapter`` (a
    sentence tokenizer, then one ``synthesize()`` per sentence), as it does for every TTS without streaming input.
    Interrupted with ``SpeechHandle.interrupt()``."""
    import logging

    from livekit.agents import Agent, AgentSession, tts
    from livekit.agents.voice import io

    from ..runtime.agents.livekit_tts import TTS as LiveKitTTS

    logging.getLogger("livekit.agents").setLevel(logging.ERROR)  # e.g. "audio output cannot pause"

    class SentenceLevel(LiveKitTTS):
        """The plugin without streaming input: LiveKit puts its sentence ``StreamAdapter`` in front."""

        def __init__(self, **kwargs: Any):
            super().__init__(**kwargs)
            self._capabilities = tts.TTSCapabilities(streaming=False)

    class Sink(io.AudioOutput):
        def __init__(self):
            super().__init__(label="bench", capabilities=io.AudioOutputCapabilities(pause=False))
            self.first_audio: float | None = None
            self.interrupted_at: float | None = None
            self.audio_after_interruption = 0
            self.playing = False

        async def capture_frame(self, frame):
            await super().capture_frame(frame)
            self.playing = True
            if self.first_audio is None:
                self.first_audio = time.perf_counter()
            if self.interrupted_at is not None:
                self.audio_after_interruption += 1

        def _finished(self, interrupted: bool) -> None:
            if self.playing:
                self.playing = False
                self.on_playback_finished(playback_position=0.0, interrupted=interrupted)

        def flush(self):
            super().flush()
            self._finished(False)

        def clear_buffer(self):
            self._finished(True)

    options = SpeakOptions(speaker=args.speaker, seed=1, min_frames=100)  # noise weights: no early end of speech
    sessions = {}
    for mode, plugin in (("token", LiveKitTTS), ("sentence", SentenceLevel)):
        session = AgentSession(tts=plugin(engine=engine, options=options))
        await session.start(Agent(instructions="Read the reply aloud."))
        sessions[mode] = session

    async def reply(mode: str) -> dict[str, float]:
        session = sessions[mode]
        sink = session.output.audio = Sink()
        typed: asyncio.Queue[str | None] = asyncio.Queue()
        marks: dict[str, float] = {}

        async def llm():  # writes the whole reply at its pace, whether or not it is still being read
            for i, piece in enumerate(words(REPLY)):
                marks.setdefault("t0", time.perf_counter())
                typed.put_nowait(piece)
                if i + 1 == first_sentence_words(REPLY):
                    marks["sentence_typed"] = time.perf_counter()
                await asyncio.sleep(args.token_ms / 1000)
            typed.put_nowait(None)

        async def text():
            while (piece := await typed.get()) is not None:
                yield piece

        writing = asyncio.create_task(llm())
        handle = session.say(text(), add_to_chat_ctx=False)
        while sink.first_audio is None:
            await asyncio.sleep(0.005)
        stats = engine.tts.last_stats
        frames_then = stats.frames
        sink.interrupted_at = t_int = time.perf_counter()
        handle.interrupt()
        while stats.stop_reason is None:
            await asyncio.sleep(0.002)
        stopped = time.perf_counter()
        await handle
        await writing
        await asyncio.sleep(0.5)  # any stale audio would arrive here
        t0 = marks["t0"]
        return {"first_audio_ms": (sink.first_audio - t0) * 1e3,
                "first_sentence_typed_ms": (marks["sentence_typed"] - t0) * 1e3,
                "stop_ms": (stopped - t_int) * 1e3, "frames_after_interruption": stats.frames - frames_then,
                "stop_reason": stats.stop_reason, "audio_frames_after_interruption": sink.audio_after_interruption,
                # the runtime's own first audio, from its request's start (for sentence mode: the first sentence's)
                "engine_first_audio_ms": None if stats.ttfa_s is None else stats.ttfa_s * 1e3}

    try:
        await reply("token")  # warm-up: the voice's prompt prefix cache, the decoder's first run
        runs: dict[str, list[dict]] = {m: [] for m in sessions}
        for _ in range(args.runs):
            for mode in sessions:
                runs[mode].append(await reply(mode))
    finally:
        for session in sessions.values():
            await session.aclose()
    return summarize(runs)


FRAMEWORKS: dict[str, Callable[[AsyncTTS, argparse.Namespace], Awaitable[dict[str, Any]]]] = {
    "pipecat": measure_pipecat,
    "livekit": measure_livekit,
}


def summarize(runs: dict[str, list[dict]]) -> dict[str, Any]:
    """Medians per mode, the token/sentence ratio of paired runs, and the interruption figures of all runs."""
    out: dict[str, Any] = {"runs": runs}
    for mode, rs in runs.items():
        out[mode] = {"first_audio_ms_median": round(statistics.median(r["first_audio_ms"] for r in rs), 1),
                     "first_audio_ms": [round(r["first_audio_ms"], 1) for r in rs]}
    if "token" in runs and "sentence" in runs:
        pairs = zip(runs["token"], runs["sentence"], strict=True)
        out["token_over_sentence"] = round(statistics.median(t["first_audio_ms"] / s["first_audio_ms"]
                                                             for t, s in pairs), 3)
    every = [r for rs in runs.values() for r in rs]
    out["first_sentence_typed_ms_median"] = round(statistics.median(r["first_sentence_typed_ms"] for r in every), 1)
    out["interruption"] = {"frames_after_max": max(r["frames_after_interruption"] for r in every),
                           "stop_ms_median": round(statistics.median(r["stop_ms"] for r in every), 1),
                           "stop_ms_max": round(max(r["stop_ms"] for r in every), 1),
                           "stale_audio_frames": sum(r["audio_frames_after_interruption"] for r in every),
                           "stop_reasons": sorted({r["stop_reason"] for r in every})}
    return out


def markdown(meta: dict[str, Any], results: dict[str, dict[str, Any]]) -> str:
    lines = [f"# Voice agents: time to first audio from the first LLM token ({meta['bundle']})", "",
             f"`bench/agents.py`, {meta['runs']} replies per mode after one warm-up, the reply streamed word by word "
             f"every {meta['token_ms']} ms ({meta['words']} words, the first sentence {meta['first_sentence_words']}),"
             f" speaker {meta['speaker']}, engine threads {meta['threads']}.", "",
             f"Machine: {meta['cpus']} cores, load average {meta['load_before']} before and {meta['load_after']} after "
             "the run (shared with other sessions' jobs: absolute times are inflated; compare the ratio, measured "
             "in the same run).", "",
             "| framework | token-level first audio (median) | sentence first audio (median) | token / sentence | "
             "first sentence written at | interruption: frames after | stop (median / max) | stale audio frames |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        i = r["interruption"]
        lines.append(f"| {name} | {r['token']['first_audio_ms_median']:.0f} ms | "
                     f"{r['sentence']['first_audio_ms_median']:.0f} ms | {r['token_over_sentence']:.2f} | "
                     f"{r['first_sentence_typed_ms_median']:.0f} ms | {i['frames_after_max']} (max) | "
                     f"{i['stop_ms_median']:.0f} / {i['stop_ms_max']:.0f} ms | {i['stale_audio_frames']} |")
    lines += ["", "Per run (ms): " + "; ".join(
        f"{name} {mode} {r[mode]['first_audio_ms']}" for name, r in results.items() for mode in ("token", "sentence")),
        "", "*Frames after*: frames the engine decoded after the interruption was queued (one frame is "
        f"{FRAME_MS} ms of audio). *Stop*: from queueing the interruption to the request having stopped. *Stale "
        "audio frames*: audio frames that left the plugin after the interruption did.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen3_tts_edge.bench.agents", description=__doc__.split("\n")[0])
    p.add_argument("--framework", action="append", choices=sorted(FRAMEWORKS), required=True,
                   help="framework(s) to measure (repeatable)")
    p.add_argument("-b", "--bundle", type=Path, required=True)
    p.add_argument("--runs", type=int, default=5, help="replies per mode")
    p.add_argument("--token-ms", type=float, default=30.0, help="pause between the reply's words (a chat LLM's pace)")
    p.add_argument("--speaker", default="ryan")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    add_engine_arguments(p.add_argument_group("engine"))
    args = p.parse_args(argv)
    config = EngineConfig.from_args(args)
    load_before = [round(x, 2) for x in os.getloadavg()]
    engine = AsyncTTS(TTS(args.bundle, config))
    results = {name: asyncio.run(FRAMEWORKS[name](engine, args)) for name in args.framework}
    meta = {"bundle": args.bundle.name, "runs": args.runs, "token_ms": args.token_ms, "speaker": args.speaker,
            "words": len(words(REPLY)), "first_sentence_words": first_sentence_words(REPLY),
            "threads": config.threads or os.cpu_count(), "cpus": os.cpu_count(), "load_before": load_before,
            "load_after": [round(x, 2) for x in os.getloadavg()], "machine": machine.describe(config.threads),
            "reply": REPLY}
    print(json.dumps({name: {k: v for k, v in r.items() if k != "runs"} for name, r in results.items()}, indent=1))
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")
    if args.markdown:
        args.markdown.write_text(markdown(meta, results))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
