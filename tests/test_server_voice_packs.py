"""Voice packs placed in the servers' ``--voices`` folder are voices: listed beside presets (OpenAI
``/v1/audio/voices`` with their kind, Wyoming ``info``), spoken by name through the batched server engine, and a
damaged one is refused with why. Driven by the official ``openai`` client and the ``wyoming`` client.

The packs here are random LoRA adapters written straight to GGUF (``bench/pack_batching.random_adapter``): what is
tested is routing and batching, not fidelity (``tests/test_voice_pack.py`` checks packs against the official
model).
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import numpy as np
import pytest

from conftest import needs_export

pytestmark = needs_export
openai = pytest.importorskip("openai")
pytest.importorskip("wyoming")

from test_server_openai import Server, frames  # noqa: E402
from wyoming.client import AsyncTcpClient  # noqa: E402
from wyoming.info import Describe, Info  # noqa: E402
from wyoming.server import AsyncTcpServer  # noqa: E402
from wyoming.tts import Synthesize, SynthesizeVoice  # noqa: E402

from qwen3_tts_edge.runtime.servers.voices import VoiceCatalog  # noqa: E402
from qwen3_tts_edge.runtime.servers.wyoming_server import WyomingService  # noqa: E402

TEXT = "A voice pack speaks through the server."


def write_pack(bundle_dir: Path, path: Path, seed: int) -> Path:
    """A pack of random rank-4 talker and predictor adapters for ``bundle_dir``'s base."""
    from qwen3_tts_edge.bench.pack_batching import random_adapter
    from qwen3_tts_edge.runtime.bundle import load_bundle
    from qwen3_tts_edge.runtime.voices.voice_pack import VoicePack, pack_identity

    b = load_bundle(bundle_dir)
    m = b.manifest
    with tempfile.TemporaryDirectory() as tmp:
        talker = random_adapter(b.root / m.component("talker", "f32").file, "qwen3tts", 4, seed, Path(tmp), b_std=0.5)
        predictor = random_adapter(b.root / m.component("predictor", "f32").file, "qwen3", 4, seed + 100, Path(tmp),
                                   b_std=0.5)
    VoicePack(talker, predictor, checkpoint=pack_identity(m), languages=("english",)).save(path)
    return path


@pytest.fixture(scope="module")
def voices(tiny_bundle, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("voices")
    write_pack(tiny_bundle, folder / "calm.voicepack", 1)
    write_pack(tiny_bundle, folder / "bright.voicepack", 2)
    return folder


def test_openai_lists_packs_and_speaks_them_in_one_batch(tiny_bundle, voices):
    with Server(tiny_bundle, workers=1, max_queue=4, voices=voices, engine={"max_batch": 4}) as s:
        c = s.client()
        listed = c.get("/audio/voices", cast_to=object)["voices"]
        assert {"id": "calm", "name": "calm", "type": "pack"} in listed
        assert {"id": "bright", "name": "bright", "type": "pack"} in listed
        assert {"id": "vivian", "name": "Vivian", "type": "preset"} in listed
        tts = s.pool.engines[0]

        async def main() -> list[bytes]:
            ac = s.async_client()

            async def one(voice: str) -> bytes:
                r = await ac.audio.speech.create(model="qwen3-tts", voice=voice, input=TEXT, response_format="pcm",
                                                 extra_body={"seed": 3, **frames(24)})
                return r.content

            return await asyncio.gather(*(one(v) for v in ("calm", "bright", "vivian", "calm")))

        switches = tts.engines.scheduler.stats.adapter_switches
        calm, bright, vivian, calm_again = asyncio.run(main())
        assert {len(calm), len(bright), len(vivian), len(calm_again)} == {24 * 3840}
        assert tts.engines.adapters.packs == 2  # both packs' adapters loaded into the one engine
        assert tts.engines.scheduler.stats.adapter_switches > switches  # the batch ran per-pack groups
        assert calm != bright  # the packs change the voice
        alone = [c.audio.speech.create(model="qwen3-tts", voice=v, input=TEXT, response_format="pcm",
                                       extra_body={"seed": 3, "greedy": True, **frames(12)}).content
                 for v in ("calm", "bright", "calm")]
        assert alone[0] == alone[2] != alone[1]  # back to the first pack: its own audio again
        with pytest.raises(openai.BadRequestError, match="unknown voice 'whisper'.*calm"):
            c.audio.speech.create(model="qwen3-tts", voice="whisper", input=TEXT)


def test_an_openai_name_can_alias_a_pack(tiny_bundle, voices):
    with Server(tiny_bundle, workers=1, max_queue=2, voices=voices) as s:
        s.catalog.set_aliases({"nova": "calm"})
        c = s.client()
        listed = c.get("/audio/voices", cast_to=object)["voices"]
        assert {"id": "nova", "name": "nova", "type": "alias", "voice": "calm"} in listed
        said = [c.audio.speech.create(model="qwen3-tts", voice=v, input=TEXT, response_format="pcm",
                                      extra_body={"seed": 3, "greedy": True, **frames(8)}).content
                for v in ("nova", "calm")]
        assert said[0] == said[1]
    with pytest.raises(ValueError, match="not a voice of this bundle; map it to one of .*calm"):
        VoiceCatalog(["vivian"], "custom_voice", voices).set_aliases({"nova": "missing-pack"})


def test_a_damaged_pack_is_refused_with_why(tiny_bundle, voices, tmp_path):
    folder = tmp_path / "v"
    folder.mkdir()
    raw = bytearray((voices / "calm.voicepack").read_bytes())
    raw[-10] ^= 0xFF
    (folder / "broken.voicepack").write_bytes(bytes(raw))
    with Server(tiny_bundle, workers=1, max_queue=2, voices=folder, engine={"max_batch": 2}) as s:
        with pytest.raises(openai.BadRequestError, match="broken.voicepack is damaged"):
            s.client().audio.speech.create(model="qwen3-tts", voice="broken", input=TEXT)
        assert s.wait_idle()["running"] == 0


def test_wyoming_lists_packs_and_speaks_one(tiny_bundle, voices):
    from qwen3_tts_edge.runtime.servers.pool import EnginePool

    pool = EnginePool.load(tiny_bundle, workers=1, max_queue=4, threads=1, max_batch=2)
    engine = pool.engines[0]
    service = WyomingService(pool, VoiceCatalog(engine.speakers, engine.ids.model_type, voices),
                             options={"min_frames": 6, "max_frames": 6})

    async def scenario(port: int) -> tuple[Info, list]:
        async with AsyncTcpClient("127.0.0.1", port) as c:
            await c.write_event(Describe().event())
            info = Info.from_event(await c.read_event())
            await c.write_event(Synthesize(text=TEXT, voice=SynthesizeVoice(name="bright")).event())
            events = []
            while True:
                event = await asyncio.wait_for(c.read_event(), 60)
                events.append(event)
                if event is None or event.type in ("audio-stop", "error"):
                    return info, events

    async def main():
        server = AsyncTcpServer("127.0.0.1", 0)
        await server.start(service.handler)
        try:
            return await scenario(server._server.sockets[0].getsockname()[1])
        finally:
            await server.stop()

    try:
        info, events = asyncio.run(main())
    finally:
        pool.close()
    voices_listed = {v.name: v.description for v in info.tts[0].voices}
    assert voices_listed["calm"] == "calm (voice pack)" and voices_listed["bright"] == "bright (voice pack)"
    assert "vivian" in voices_listed
    assert [e.type for e in events][-1] == "audio-stop", events[-1]
    audio = b"".join(e.payload or b"" for e in events if e.type == "audio-chunk")
    assert len(audio) == 6 * 3840 and np.frombuffer(audio, "<i2").any()
    assert engine.engines.adapters.packs == 1
