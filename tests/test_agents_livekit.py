"""The LiveKit Agents plugin: the audio of ``TTS.stream``, token-level text as one utterance, a stop within two
frames, LiveKit's own voice pipeline using it without a ``StreamAdapter``, and clear errors.

Driven directly with asyncio on the tiny bundle's llama.cpp f32 engines (no room, no server); the voice pipeline
test runs a real ``AgentSession`` whose only stand-in is the audio sink a room would provide.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading

import numpy as np
import pytest

from conftest import llm_reply, needs_export

pytest.importorskip("livekit.agents", reason="needs the [livekit] extra")
from livekit.agents import APIError, tts  # noqa: E402
from livekit.agents.voice import io  # noqa: E402

from qwen3_tts_edge.runtime.agents import livekit_tts  # noqa: E402
from qwen3_tts_edge.runtime.aio import AsyncTTS  # noqa: E402
from qwen3_tts_edge.runtime.audio import to_s16le  # noqa: E402
from qwen3_tts_edge.runtime.voices.voice_file import Voice  # noqa: E402

pytestmark = needs_export
TEXT = "Streaming text from a language model, read aloud while it is still being written."
OPTS = dict(speaker="ryan", max_frames=60, chunk_frames=(1, 2, 4))
# A reply that would run for a long time: no end of speech before 1500 frames, no runaway guard.
ENDLESS = dict(speaker="ryan", seed=1, min_frames=1500, max_frames=1500, frames_per_text_token=None,
               chunk_frames=(1,))


@pytest.fixture(scope="module")
def engine(tiny_bundle):
    from qwen3_tts_edge.runtime.pipeline import TTS

    return TTS(tiny_bundle, talker_precision="f32", threads=1)


def _whole(engine, text: str = TEXT, **opts) -> bytes:
    """What ``TTS.stream`` gives for the whole text, as the 16-bit PCM LiveKit carries."""
    return to_s16le(np.concatenate([c.pcm for c in engine.stream(text, **opts)]))


def _pcm(events) -> bytes:
    return b"".join(bytes(ev.frame.data) for ev in events)


def _threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("qwen3-tts-edge-")}


async def _left_after(before: set[threading.Thread], timeout: float = 2.0) -> set[str]:
    """The runtime's threads started since ``before`` still alive after ``timeout`` (a finished worker returns
    just after it has said so)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while (left := _threads() - before) and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.01)
    return {t.name for t in left}


def test_synthesize_gives_what_tts_stream_gives(engine):
    opts = dict(OPTS, seed=3)
    want = _whole(engine, **opts)

    async def main():
        plugin = livekit_tts.TTS(engine=engine, **opts)
        return plugin, [ev async for ev in plugin.synthesize(TEXT)]

    plugin, events = asyncio.run(main())
    assert _pcm(events) == want and len(want) > 40 * 1920
    assert plugin.sample_rate == 24000 and plugin.num_channels == 1
    assert {(ev.frame.sample_rate, ev.frame.num_channels) for ev in events} == {(24000, 1)}
    assert len({ev.request_id for ev in events}) == 1 and [ev.is_final for ev in events][-2:] == [False, True]


@pytest.mark.parametrize("mode", [{"greedy": True}, {"seed": 7}], ids=["greedy", "sampled"])
def test_stream_fed_token_by_token_is_one_utterance_of_the_whole_text(engine, mode):
    opts = dict(OPTS, **mode)
    want = _whole(engine, **opts)

    async def main():
        plugin = livekit_tts.TTS(engine=engine, **opts)
        metrics = []
        plugin.on("metrics_collected", metrics.append)
        stream = plugin.stream()

        async def feed():
            async for token in llm_reply(TEXT, seed=5):
                stream.push_text(token)
            stream.end_input()

        feeding = asyncio.create_task(feed())
        events = [ev async for ev in stream]
        await feeding
        await stream.aclose()
        return events, metrics

    events, metrics = asyncio.run(main())
    assert _pcm(events) == want
    assert len({ev.segment_id for ev in events}) == 1 and [ev.is_final for ev in events].count(True) == 1
    assert engine.last_stats.text_wait_ms > 0  # generation caught up with the text and waited for it
    [m] = metrics  # LiveKit's own accounting of the segment: first audio counted from the first text
    assert m.streamed and 0 < m.ttfb < m.duration and m.audio_duration == pytest.approx(len(want) / 2 / 24000)


def test_flush_ends_the_utterance_at_the_segment_boundary(engine):
    """LiveKit's ``flush()`` closes the segment: the utterance ends there (without it, generation would wait for
    more text), and its last frame is final before ``end_input()``."""
    opts = dict(OPTS, seed=4)

    async def main():
        stream = livekit_tts.TTS(engine=engine, **opts).stream()
        for word in TEXT.split(" "):
            stream.push_text(word if word.endswith(".") else word + " ")
        stream.flush()
        events = []
        async for ev in stream:
            events.append(ev)
            if ev.is_final:
                break
        stream.end_input()
        rest = [ev async for ev in stream]
        return events, rest

    events, rest = asyncio.run(asyncio.wait_for(main(), timeout=20))
    assert _pcm(events) == _whole(engine, **opts) and rest == []


@pytest.mark.parametrize("how", ["stream.aclose", "tts.aclose"])
def test_closing_mid_reply_stops_generation_within_two_frames(engine, how):
    async def main():
        before = _threads()
        plugin = livekit_tts.TTS(engine=engine, **ENDLESS)
        if how == "stream.aclose":
            stream = plugin.stream()
            stream.push_text(TEXT)
        else:
            stream = plugin.synthesize(TEXT)
        got = [await anext(stream) for _ in range(3)]  # generation is running, ahead of this consumer
        made = engine.predictor.frames
        await (stream.aclose() if how == "stream.aclose" else plugin.aclose())
        after = engine.predictor.frames - made
        return got, after, await _left_after(before)

    got, after, left = asyncio.run(main())
    assert len(got) == 3 and after <= 2, after  # the frame in flight, at most one more
    assert engine.last_stats.stop_reason == "cancelled" and engine.last_stats.frames < 1500
    assert left == set()  # the request's threads end with it


class _Sink(io.AudioOutput):
    """The audio output a room would give the session: it keeps what it is given."""

    def __init__(self) -> None:
        super().__init__(label="sink", capabilities=io.AudioOutputCapabilities(pause=False))
        self.frames: list = []
        self.first = asyncio.Event()
        self._playing = False

    async def capture_frame(self, frame) -> None:
        await super().capture_frame(frame)
        self.frames.append(frame)
        self._playing = True
        self.first.set()

    def _finished(self, interrupted: bool) -> None:
        if self._playing:
            self._playing = False
            self.on_playback_finished(playback_position=sum(f.duration for f in self.frames), interrupted=interrupted)

    def flush(self) -> None:
        super().flush()
        self._finished(interrupted=False)

    def clear_buffer(self) -> None:
        self._finished(interrupted=True)


def test_the_voice_pipeline_speaks_the_tokens_as_they_come_without_a_stream_adapter(engine, monkeypatch):
    """An ``AgentSession`` says an LLM-like token stream that pauses after four words until audio has come: a
    sentence-buffering path (LiveKit's ``StreamAdapter``) would wait for the sentence and never get there."""
    from livekit.agents import Agent, AgentSession

    opts = dict(OPTS, seed=2)
    want = _whole(engine, **opts)
    adapters = []
    wrap = tts.StreamAdapter.__init__
    monkeypatch.setattr(tts.StreamAdapter, "__init__", lambda self, **kw: adapters.append(kw) or wrap(self, **kw))

    async def main():
        session = AgentSession(tts=livekit_tts.TTS(engine=engine, **opts))
        await session.start(Agent(instructions="Read aloud."))
        sink = session.output.audio = _Sink()
        words = TEXT.split(" ")

        async def reply():
            for i, word in enumerate(words):
                yield word + (" " if i < len(words) - 1 else "")
                if i == 3:
                    await asyncio.wait_for(sink.first.wait(), timeout=20)  # the rest only after audio came

        handle = session.say(reply(), add_to_chat_ctx=False)
        await handle
        await session.aclose()
        return sink.frames

    frames = asyncio.run(main())
    assert adapters == []
    assert b"".join(bytes(f.data) for f in frames) == want


def test_an_interruption_in_the_voice_pipeline_stops_generation_within_two_frames(engine):
    from livekit.agents import Agent, AgentSession

    async def main():
        before = _threads()
        session = AgentSession(tts=livekit_tts.TTS(engine=engine, **ENDLESS))
        await session.start(Agent(instructions="Read aloud."))
        sink = session.output.audio = _Sink()
        handle = session.say(TEXT, add_to_chat_ctx=False)
        await asyncio.wait_for(sink.first.wait(), timeout=20)
        made = engine.predictor.frames
        handle.interrupt()
        await handle
        left = await _left_after(before, timeout=5.0)  # the request's threads end once its stream is closed
        after = engine.predictor.frames - made
        await session.aclose()
        return after, handle.interrupted, left

    after, interrupted, left = asyncio.run(asyncio.wait_for(main(), timeout=30))
    assert interrupted and left == set() and after <= 2, after
    assert engine.last_stats.stop_reason == "cancelled" and engine.last_stats.frames < 1500


def test_two_agents_share_one_engine(engine, tiny_bundle):
    """Agents in one process on one engine: with one lane they take turns and each gets its own audio; with
    ``max_batch=2`` their replies run at once (both speak before either is done)."""
    from qwen3_tts_edge.runtime.pipeline import TTS

    a, b = dict(OPTS, speaker="ryan", seed=1), dict(OPTS, speaker="vivian", seed=2)
    want = [_whole(engine, **a), _whole(engine, **b)]
    batched = AsyncTTS(TTS(tiny_bundle, talker_precision="f32", threads=1, max_batch=2))

    async def main():
        shared = AsyncTTS(engine)
        one_lane = await asyncio.gather(*(_collect(livekit_tts.TTS(engine=shared, **o).synthesize(TEXT))
                                          for o in (a, b)))
        streams = [livekit_tts.TTS(engine=batched, **ENDLESS).synthesize(TEXT) for _ in range(2)]
        firsts = await asyncio.wait_for(asyncio.gather(*(anext(s) for s in streams)), timeout=30)
        running = [not s.done for s in streams]
        await asyncio.gather(*(s.aclose() for s in streams))
        return one_lane, firsts, running

    one_lane, firsts, running = asyncio.run(main())
    assert [_pcm(events) for events in one_lane] == want and want[0] != want[1]
    assert len(firsts) == 2 and running == [True, True]


async def _collect(stream) -> list:
    return [ev async for ev in stream]


def test_update_options_applies_to_the_next_reply(engine):
    async def main():
        plugin = livekit_tts.TTS(engine=engine, **OPTS, seed=1)
        before = plugin.stream()  # opened first: keeps the options it started with
        plugin.update_options(speaker="vivian", seed=5, language="en-US")  # LiveKit's language codes work too
        before.push_text(TEXT)
        before.end_input()
        return await _collect(before), await _collect(plugin.synthesize(TEXT)), plugin.options

    first, second, options = asyncio.run(main())
    assert _pcm(first) == _whole(engine, **OPTS, seed=1)
    assert _pcm(second) == _whole(engine, **dict(OPTS, speaker="vivian"), seed=5, language="english")
    assert _pcm(second) != _whole(engine, **dict(OPTS, speaker="vivian"), seed=5)  # the language is in the prompt
    assert options.speaker == "vivian" and options.seed == 5 and options.language == "english"


def test_bad_options_give_clear_errors(engine, tiny_bundle, tmp_path):
    async def main():
        with pytest.raises(ValueError, match="unknown speaker 'nobody'; choose one of"):
            livekit_tts.TTS(engine=engine, speaker="nobody")
        with pytest.raises(ValueError, match="temperature must be a positive number"):
            livekit_tts.TTS(engine=engine, speaker="ryan", temperature=-1.0)
        with pytest.raises(TypeError, match=r"unknown speak options \['speed'\].*engine settings"):
            livekit_tts.TTS(engine=engine, speaker="ryan", speed=1.2)
        with pytest.raises(Exception, match="missing.voice does not exist; make one with"):
            livekit_tts.TTS(engine=engine, voice=tmp_path / "missing.voice")
        hidden = engine.bundle.manifest.model["talker"]["hidden_size"]
        voice = Voice(x_vector=np.ones(hidden, np.float32)).save(tmp_path / "someone.voice")
        with pytest.raises(Exception, match="custom_voice bundle; voices are for Base models"):
            livekit_tts.TTS(engine=engine, voice=str(voice))  # read, then checked as a request would check it
        with pytest.raises(TypeError, match="either engine= .* or a bundle"):
            livekit_tts.TTS(tiny_bundle, engine=engine, speaker="ryan")
        with pytest.raises(TypeError, match="either engine= .* or a bundle.*threads"):
            livekit_tts.TTS(engine=engine, threads=2, speaker="ryan")
        with pytest.raises(TypeError, match="needs a bundle"):
            livekit_tts.TTS(speaker="ryan")
        with pytest.raises(TypeError, match="engine must be a qwen3_tts_edge AsyncTTS or TTS"):
            livekit_tts.TTS(engine="tiny", speaker="ryan")
        plugin = livekit_tts.TTS(engine=engine, speaker="ryan")
        with pytest.raises(TypeError, match=r"\['threads'\] are engine settings"):
            plugin.update_options(threads=2)
        with pytest.raises(ValueError, match="language 'klingon' is not one this bundle speaks; choose one of"):
            plugin.update_options(language="klingon")
        assert plugin.options.speaker == "ryan" and plugin.options.language == "auto"  # unchanged
        with pytest.raises(APIError, match="could not speak") as failed:  # text the tokenizer cannot take
            await _collect(plugin.synthesize("Hello \ud800 there."))
        return failed.value

    failed = asyncio.run(main())
    assert not failed.retryable and "lone surrogate" in str(failed.__cause__)


def test_a_bundle_path_loads_the_engine_like_tts_does(tiny_bundle):
    async def main():
        plugin = livekit_tts.TTS(tiny_bundle, talker_precision="f32", threads=1, speaker="ryan", seed=1,
                                 max_frames=2, min_frames=2)
        return plugin, await _collect(plugin.synthesize("Hi."))

    plugin, events = asyncio.run(main())
    assert plugin.engine.tts.talker_precision == "f32" and plugin.engine.tts.config.threads == 1
    assert len(_pcm(events)) == 2 * 1920 * 2 and plugin.provider == "qwen3-tts-edge"
    assert plugin.model == "random:tiny-custom_voice"


def test_without_livekit_the_import_names_the_extra():
    code = ("import sys; sys.modules['livekit'] = None\n"
            "import qwen3_tts_edge.runtime.agents\n"
            "try:\n"
            "    import qwen3_tts_edge.runtime.agents.livekit_tts\n"
            "except ImportError as exc:\n"
            "    print(exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'qwen3-tts-edge[livekit]'" in out.stdout, out.stderr


def test_bench_measures_first_audio_in_both_modes(tiny_bundle, tmp_path):
    """``bench/agents.py --framework livekit`` end to end on the tiny bundle: both modes through an AgentSession,
    every reply interrupted and stopped (the speed itself is bench's business, not asserted here)."""
    import json

    from qwen3_tts_edge.bench.agents import main

    out = tmp_path / "agents.json"
    assert main(["--framework", "livekit", "-b", str(tiny_bundle), "--runs", "1", "--token-ms", "5",
                 "--talker-precision", "f32", "--json", str(out), "--markdown", str(tmp_path / "agents.md")]) == 0
    r = json.loads(out.read_text())["results"]["livekit"]
    assert len(r["runs"]["token"]) == len(r["runs"]["sentence"]) == 1
    assert r["interruption"]["stop_reasons"] == ["cancelled"] and r["interruption"]["frames_after_max"] <= 2
    assert all(run["engine_first_audio_ms"] > 0 for runs in r["runs"].values() for run in runs)
    assert r["token_over_sentence"] > 0 and "| livekit |" in (tmp_path / "agents.md").read_text()
