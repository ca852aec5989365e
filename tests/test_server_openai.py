"""The OpenAI-compatible server, driven by the official ``openai`` client against a real uvicorn on 127.0.0.1.

Random tiny bundles speak noise, so lengths are forced (``min_new_tokens`` = ``max_new_tokens`` = N frames:
N x 1920 samples, N x 3840 bytes of pcm) and equality is checked for fixed seeds.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import threading
import time
import urllib.request

import numpy as np
import pytest

pytest.importorskip("fastapi")
openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")
sf = pytest.importorskip("soundfile")

from qwen3_tts_edge.runtime.servers.openai_api import create_app  # noqa: E402
from qwen3_tts_edge.runtime.servers.pool import EnginePool  # noqa: E402
from qwen3_tts_edge.runtime.servers.voices import VoiceCatalog  # noqa: E402

SAMPLES_PER_FRAME = 1920
TEXT = "Hello there, this is a test of the speech server."
LONG = " ".join([TEXT] * 25)  # room for 2000+ frames under the runaway guard (8 frames per text token)


class Server:
    """uvicorn on an ephemeral port in a background thread, over its own engine pool."""

    def __init__(self, bundle, workers=1, max_queue=8, voices=None, engine=None, **app_options):
        self.pool = EnginePool.load(bundle, workers=workers, max_queue=max_queue, threads=1, **(engine or {}))
        engine = self.pool.engines[0]
        catalog = VoiceCatalog(engine.speakers, engine.ids.model_type, voices)
        self.app = create_app(self.pool, catalog, **app_options)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> Server:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)

    def client(self, api_key="test", **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60, **kw)

    def async_client(self) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key="test", max_retries=0, timeout=60)

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=10) as r:
            return json.loads(r.read())

    def wait_idle(self, timeout=10.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            h = self.health()
            if (h["busy"] == 0 and h["queued"] == 0) or time.monotonic() > deadline:
                return h
            time.sleep(0.02)


def frames(n: int) -> dict:
    return {"min_new_tokens": n, "max_new_tokens": n}


@pytest.fixture(scope="module")
def server(tiny_bundle):
    with Server(tiny_bundle, workers=2, max_queue=8) as s:
        yield s


def speak(client, fmt="pcm", n=6, seed=1, **kw) -> bytes:
    return client.audio.speech.create(model="qwen3-tts", voice="vivian", input=TEXT, response_format=fmt,
                                      extra_body={"seed": seed, **frames(n), **kw.pop("extra", {})}, **kw).content


def decode(data: bytes, fmt: str) -> np.ndarray:
    if fmt == "pcm":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32767
    pcm, rate = sf.read(io.BytesIO(data), dtype="float32")
    assert rate == 24000
    return pcm


def test_models_health_and_voices(server):
    c = server.client()
    models = [m.id for m in c.models.list()]
    assert models == ["qwen3-tts-0.6b-customvoice"]
    h = server.health()
    assert h["status"] == "ok" and h["workers"] == 2 and h["max_queue"] == 8 and h["sample_rate"] == 24000
    voices = c.get("/audio/voices", cast_to=object)["voices"]
    assert {"id": "vivian", "name": "Vivian", "type": "preset"} in voices
    assert [v["id"] for v in voices] == sorted(server.pool.engines[0].speakers)


@pytest.mark.parametrize("fmt", ["pcm", "wav", "flac"])
def test_formats_whole_and_streamed(server, fmt):
    c = server.client()
    whole = speak(c, fmt, n=7, seed=3)
    with c.audio.speech.with_streaming_response.create(model="qwen3-tts", voice="vivian", input=TEXT,
                                                       response_format=fmt, extra_body={"seed": 3, **frames(7)}) as r:
        assert r.headers["content-type"].startswith("audio/")
        streamed = b"".join(r.iter_bytes(chunk_size=4096))
    a, b = decode(whole, fmt), decode(streamed, fmt)
    assert len(a) == len(b) == 7 * SAMPLES_PER_FRAME
    np.testing.assert_array_equal(a, b)
    if fmt == "pcm":
        assert len(whole) == 7 * SAMPLES_PER_FRAME * 2
    if fmt == "wav":  # streamed header: sizes unknown, then exactly the pcm samples
        assert whole[:4] == b"RIFF" and whole[4:8] == b"\xff\xff\xff\xff" and len(whole) == 44 + 7 * 3840
        assert whole[44:] == speak(c, "pcm", n=7, seed=3)


@pytest.mark.parametrize("fmt", ["opus", "mp3"])
def test_compressed_formats_decode_to_the_utterance(server, fmt):
    data = speak(server.client(), fmt, n=10)
    pcm = decode(data, fmt)
    assert abs(len(pcm) - 10 * SAMPLES_PER_FRAME) <= 2 * 1152  # codec priming / frame padding only
    assert np.abs(pcm).max() > 0


def test_default_format_is_mp3_like_openai(server):
    r = server.client().audio.speech.with_raw_response.create(model="tts-1", voice={"id": "ryan"}, input="Hi.",
                                                              extra_body=frames(3))
    assert r.headers["content-type"] == "audio/mpeg"
    assert len(decode(r.content, "mp3")) > 0


def test_sse_events_carry_the_same_audio(server):
    c = server.client()
    whole = speak(c, "pcm", n=9, seed=5)
    with c.audio.speech.with_streaming_response.create(model="qwen3-tts", voice="vivian", input=TEXT,
                                                       response_format="pcm", stream_format="sse",
                                                       extra_body={"seed": 5, **frames(9)}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:")]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2 and events[-1]["type"] == "speech.audio.done"
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    assert b"".join(base64.b64decode(e["audio"]) for e in deltas) == whole
    usage = events[-1]["usage"]
    n_tokens = len(server.pool.engines[0].tokenizer.encode(TEXT))
    assert usage == {"input_tokens": n_tokens, "output_tokens": 9, "total_tokens": n_tokens + 9}


def test_first_audio_arrives_while_the_utterance_is_still_being_made(server):
    c = server.client()
    with c.audio.speech.with_streaming_response.create(model="qwen3-tts", voice="vivian", input=LONG,
                                                       response_format="pcm", extra_body=frames(400)) as r:
        chunks = r.iter_bytes()
        first = next(chunks)
        during = server.health()
        rest = b"".join(chunks)
    assert 0 < len(first) < 400 * 3840 and during["busy"] >= 1  # bytes came out, the request was still running
    assert len(first) + len(rest) == 400 * 3840


@pytest.mark.parametrize("body,param,words", [
    ({"input": ""}, "input", "empty"),
    ({"input": "x" * 4097}, "input", "4096"),
    ({"voice": "alloy"}, "voice", "vivian"),
    ({"voice": {"id": "nobody"}}, "voice", "available voices"),
    ({"response_format": "aac"}, "response_format", "pcm"),
    ({"speed": 1.5}, "speed", "time-stretch"),
    ({"speed": 9}, "speed", "0.25"),
    ({"instructions": "Speak happily."}, "instructions", "instruct"),
    ({"language": "klingon"}, "language", "english"),
    ({"ref_audio": "UklGRg=="}, "ref_audio", "Base"),
    ({"seed": "one"}, "seed", "integer"),
])
def test_bad_requests_name_their_field(server, body, param, words):
    args = {"model": "qwen3-tts", "voice": "vivian", "input": "Hello."}
    extra = {k: v for k, v in body.items() if k not in args}
    args.update({k: v for k, v in body.items() if k in args})
    with pytest.raises(openai.BadRequestError) as e:
        server.client().audio.speech.create(**args, extra_body=extra)
    assert e.value.status_code == 400 and e.value.param == param and e.value.type == "invalid_request_error"
    assert words in e.value.message


def test_speed_one_is_accepted(server):
    assert len(speak(server.client(), "pcm", n=3, speed=1.0)) == 3 * 3840


def test_unknown_route_is_a_404_in_openai_shape(server):
    with pytest.raises(openai.NotFoundError) as e:
        server.client().get("/audio/nothing", cast_to=object)
    assert "no such route" in e.value.message


def test_load_20_clients_complete_or_get_429(server):
    """20 concurrent clients x 5 requests on 2 workers + 8 queue slots: full audio or a 429, nothing hangs."""
    n = 6
    results: list[tuple[str, int]] = []

    async def one_client(i: int):
        c = server.async_client()
        try:
            for j in range(5):
                try:
                    r = await c.audio.speech.create(model="qwen3-tts", voice="vivian", input=f"Client {i} says {j}.",
                                                    response_format="pcm", extra_body={"seed": i, **frames(n)})
                    results.append(("ok", len(r.content)))
                except openai.RateLimitError as exc:
                    assert int(exc.response.headers["retry-after"]) >= 1 and exc.code == "queue_full"
                    results.append(("429", 0))
        finally:
            await c.close()

    async def main():
        await asyncio.wait_for(asyncio.gather(*(one_client(i) for i in range(20))), timeout=120)

    asyncio.run(main())
    assert len(results) == 100
    ok = [size for kind, size in results if kind == "ok"]
    assert all(size == n * SAMPLES_PER_FRAME * 2 for size in ok)
    assert len(ok) >= 10  # the first wave alone fills 2 workers + 8 queue slots, all of which must finish
    assert len(ok) < 100  # and the queue bound did refuse some
    h = server.wait_idle()
    print(f"load: {len(ok)} of 100 requests completed with full audio, {100 - len(ok)} got 429")
    assert h["busy"] == 0 and h["queued"] == 0 and h["rejected"] >= 100 - len(ok)


def test_disconnect_storm_frees_every_worker(server):
    """Clients that close after the first chunk cancel their requests: no worker stays busy."""
    import httpx2

    body = {"model": "qwen3-tts", "voice": "vivian", "input": LONG, "response_format": "pcm", **frames(2000)}

    async def impatient(client):
        try:
            async with client.stream("POST", f"{server.url}/v1/audio/speech", json=body) as r:
                if r.status_code == 200:
                    async for _ in r.aiter_bytes():
                        break
                return r.status_code
        except httpx2.HTTPError:
            return -1

    async def main():
        async with httpx2.AsyncClient(timeout=60) as client:
            return await asyncio.gather(*(impatient(client) for _ in range(10)))

    t0 = time.monotonic()
    codes = asyncio.run(main())
    assert set(codes) <= {200, 429} and 200 in codes
    h = server.wait_idle(timeout=15)
    print(f"disconnect storm: {codes.count(200)} streams opened and dropped, workers idle after "
          f"{time.monotonic() - t0:.2f} s")
    # 10 requests of 2000 frames would hold 2 workers for minutes; cancelled, they are gone within seconds.
    assert h["busy"] == 0 and h["queued"] == 0, h
    assert time.monotonic() - t0 < 30
    assert len(speak(server.client(), "pcm", n=4)) == 4 * 3840  # and the server still speaks


def test_one_batched_engine_streams_concurrent_requests_together(tiny_bundle):
    """--max-batch 2 on one worker: two requests stream at once (the second does not wait for the first's whole
    reply), /health shows both running, a third waits in the queue, and every reply is complete."""
    with Server(tiny_bundle, workers=1, max_queue=4, engine={"max_batch": 2}) as s:
        h = s.health()
        assert (h["workers"], h["max_batch"], h["capacity"], h["running"]) == (1, 2, 2, 0)
        firsts: dict[int, float] = {}
        ends: dict[int, float] = {}
        seen: list[dict] = []

        async def one(i: int, client) -> int:
            body = {"model": "qwen3-tts", "voice": "vivian", "input": f"Request {i} of three.",
                    "response_format": "pcm", "seed": i, **frames(40)}
            n = 0
            async with client.stream("POST", f"{s.url}/v1/audio/speech", json=body) as r:
                assert r.status_code == 200
                async for data in r.aiter_bytes():
                    if i not in firsts:
                        firsts[i] = time.monotonic()
                        if i == 1:
                            seen.append(await asyncio.to_thread(s.health))
                    n += len(data)
            ends[i] = time.monotonic()
            return n

        async def main():
            import httpx2

            async with httpx2.AsyncClient(timeout=120) as client:
                first_two = [asyncio.create_task(one(i, client)) for i in (0, 1)]
                await asyncio.sleep(0.3)
                third = asyncio.create_task(one(2, client))
                return await asyncio.gather(*first_two, third)

        sizes = asyncio.run(main())
        assert sizes == [40 * 3840] * 3
        assert firsts[1] < ends[0] and firsts[0] < ends[1]  # streamed together, not one after the other
        assert seen and seen[0]["running"] == 2 and seen[0]["max_batch"] == 2
        assert s.wait_idle()["running"] == 0


def test_memory_is_flat_over_200_requests(server):
    psutil = pytest.importorskip("psutil")
    proc = psutil.Process()
    c = server.client()
    rss = {}
    for i in range(1, 201):
        assert len(speak(c, "pcm", n=2, seed=i)) == 2 * 3840
        if i in (20, 200):
            rss[i] = proc.memory_info().rss
    print(f"RSS after 20 requests {rss[20] / 2**20:.1f} MiB, after 200 {rss[200] / 2**20:.1f} MiB")
    assert rss[200] <= rss[20] * 1.05, {k: v / 2**20 for k, v in rss.items()}


def test_voice_upload_list_speak_delete(base_bundle, ref_wav, tmp_path):
    voices = tmp_path / "voices"
    with Server(base_bundle, voices=voices, max_upload_bytes=400_000) as s:
        c = s.client()
        with pytest.raises(openai.BadRequestError) as e:  # a Base bundle with no voices yet
            c.audio.speech.create(model="m", voice="anything", input="Hi.", extra_body=frames(2))
        assert e.value.param == "voice" and "upload" in e.value.message
        with open(ref_wav, "rb") as f:
            made = c.audio.voices.create(audio_sample=f, consent="none", name="myclone",
                                         extra_body={"ref_text": "This is my voice."})
        assert made.id == "myclone" and made.object == "audio.voice"
        assert [p.name for p in voices.iterdir()] == ["myclone.voice"]  # no temporary files left behind
        listed = c.get("/audio/voices", cast_to=object)
        assert {"id": "myclone", "name": "myclone", "type": "saved"} in listed["voices"]
        assert listed["uploaded_voices"] == ["myclone"]
        with open(ref_wav, "rb") as f, pytest.raises(openai.ConflictError):
            c.audio.voices.create(audio_sample=f, consent="none", name="myclone")
        pcm = c.audio.speech.create(model="m", voice={"id": "myclone"}, input=TEXT, response_format="pcm",
                                    extra_body={"seed": 1, **frames(5)}).content
        assert len(pcm) == 5 * 3840
        one_shot = c.audio.speech.create(model="m", voice="ignored", input=TEXT, response_format="pcm",
                                         extra_body={"seed": 1, **frames(5), "ref_text": "This is my voice.",
                                                     "ref_audio": base64.b64encode(ref_wav.read_bytes()).decode()})
        assert one_shot.content == pcm  # the same clone, made on the fly
        with pytest.raises(openai.BadRequestError) as e:
            c.audio.speech.create(model="m", voice="myclone", input="Hi.", instructions="Be happy.")
        assert e.value.param == "instructions"
        assert c.audio.voices.delete("myclone").deleted
        assert list(voices.iterdir()) == []
        with pytest.raises(openai.NotFoundError) as e:
            c.audio.voices.delete("myclone")
        assert e.value.param == "name"
        with pytest.raises(openai.BadRequestError) as e:
            c.audio.speech.create(model="m", voice="myclone", input="Hi.")
        assert e.value.param == "voice"
        with pytest.raises(openai.BadRequestError) as e:
            c.audio.voices.create(audio_sample=io.BytesIO(b"not audio at all"), consent="none", name="junk")
        assert e.value.param == "audio_sample" and not (voices / "junk.voice").exists()
        with pytest.raises(openai.BadRequestError) as e:
            c.audio.voices.create(audio_sample=io.BytesIO(b"x"), consent="none", name="../escape")
        assert e.value.param == "name"
        big = b"\0" * 500_000
        with pytest.raises(openai.APIStatusError) as e:
            c.audio.voices.create(audio_sample=io.BytesIO(big), consent="none", name="big")
        assert e.value.status_code == 413 and e.value.param == "audio_sample"
        with pytest.raises(openai.APIStatusError) as e:
            c.audio.speech.create(model="m", voice="x", input="Hi.", extra_body={"ref_audio": base64.b64encode(big)
                                                                                 .decode()})
        assert e.value.status_code == 413 and e.value.param == "ref_audio"
        assert list(voices.iterdir()) == []


def test_api_key_is_required_when_set(tiny_bundle):
    with Server(tiny_bundle, api_key="s3cret") as s:
        with pytest.raises(openai.AuthenticationError) as e:
            s.client(api_key="wrong").models.list()
        assert e.value.code == "invalid_api_key"
        assert s.health()["status"] == "ok"  # /health stays open for probes
        assert len(speak(s.client(api_key="s3cret"), "pcm", n=2)) == 2 * 3840
