"""The OpenAI-compatible server, driven by the official ``openai`` client against a real uvicorn on 127.0.0.1.

Random tiny bundles speak noise, so lengths are forced (``min_new_tokens`` = ``max_new_tokens`` = N frames:
N x 1920 samples, N x 3840 bytes of pcm) and equality is checked for fixed seeds.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import logging
import os
import socket
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

    def __init__(self, bundle, workers=1, max_queue=8, voices=None, engine=None, uvicorn_options=None,
                 **app_options):
        self.pool = EnginePool.load(bundle, workers=workers, max_queue=max_queue, threads=1, **(engine or {}))
        engine = self.pool.engines[0]
        self.catalog = VoiceCatalog(engine.speakers, engine.ids.model_type, voices)
        self.app = create_app(self.pool, self.catalog, **app_options)
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="warning", access_log=False,
                                **(uvicorn_options or {}))
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


def raw_post(port: int, path: str, headers: dict, chunks=(), host: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    """POST over a plain socket, the body sent from a thread while the reply is read, so a server that answers
    before the body is in (a 413) is heard although the client is still sending."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = f"POST {path} HTTP/1.1\r\nHost: {host}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    sock.sendall((head + "\r\n").encode())

    def send() -> None:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:  # the server answered and closed: stop sending
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    data = b""
    try:
        while True:
            part = sock.recv(65536)
            if not part:
                break
            data += part
            top, sep, body = data.partition(b"\r\n\r\n")
            if sep:
                fields = dict(line.split(": ", 1) for line in top.decode("latin-1").split("\r\n")[1:])
                fields = {k.lower(): v for k, v in fields.items()}
                if len(body) >= int(fields.get("content-length", "0")):
                    return int(top.split()[1]), fields, body
    finally:
        sock.close()
        sender.join(timeout=30)
    raise AssertionError(f"no complete reply: {data[:200]!r}")


def chunked(total: int, piece: int = 1 << 20):
    """``total`` bytes as HTTP chunks, made from one buffer (the client's own memory stays flat)."""
    block = b"x" * piece
    size = f"{piece:x}\r\n".encode()
    for _ in range(total // piece):
        yield size
        yield block
        yield b"\r\n"
    yield b"0\r\n\r\n"


class PeakRSS:
    """The process's resident memory sampled every 5 ms on a thread: ``growth`` is the peak over the start."""

    def __init__(self):
        psutil = pytest.importorskip("psutil")
        self.proc, self.stop = psutil.Process(), threading.Event()

    def __enter__(self) -> PeakRSS:
        self.start = self.peak = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.growth = self.peak - self.start


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
    ({"ref_audio": ""}, "ref_audio", "empty"),  # found by the fuzz suite: an empty clip was taken as no clip
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


def test_voice_upload_list_speak_delete(base_bundle, ref_wav, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="qwen3_tts_edge.server")
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
        assert "/tmp" not in e.value.message and "qwen3-tts-edge-upload" not in e.value.message  # no internals
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
        # A chunked upload (no Content-Length) is capped too, while it is read: nothing spooled, nothing saved.
        boundary = "b0undary"
        head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\nhuge\r\n--{boundary}\r\n"
                'Content-Disposition: form-data; name="audio_sample"; filename="a.wav"\r\n\r\n').encode()
        status, _, reply = raw_post(s.port, "/v1/audio/voices",
                                    {"Content-Type": f"multipart/form-data; boundary={boundary}",
                                     "Transfer-Encoding": "chunked"},
                                    [f"{len(head):x}\r\n".encode(), head, b"\r\n", *chunked(20 << 20)])
        assert status == 413 and json.loads(reply)["error"]["param"] == "audio_sample"
        assert list(voices.iterdir()) == []
    logged = [r.getMessage() for r in caplog.records if r.name == "qwen3_tts_edge.server"]
    assert any("voice 'myclone' saved (icl" in m and "127.0.0.1" in m for m in logged), logged
    assert any("voice 'myclone' deleted for 127.0.0.1" in m for m in logged), logged


def test_api_key_is_required_when_set(tiny_bundle):
    with Server(tiny_bundle, api_key="s3cret") as s:
        with pytest.raises(openai.AuthenticationError) as e:
            s.client(api_key="wrong").models.list()
        assert e.value.code == "invalid_api_key"
        assert s.health()["status"] == "ok"  # /health stays open for probes
        assert len(speak(s.client(api_key="s3cret"), "pcm", n=2)) == 2 * 3840


def test_a_150_mb_body_is_refused_while_it_is_read(server):
    """Declared or chunked, a body over the route's cap is a 413 at the cap: the server never holds it (before: a
    150 MB JSON body was read whole, 270 -> 533 MB, and then got a 400)."""
    with PeakRSS() as declared:
        status, headers, body = raw_post(server.port, "/v1/audio/speech", {"Content-Type": "application/json",
                                                                          "Content-Length": str(150 << 20)})
    assert status == 413 and json.loads(body)["error"]["code"] == "body_too_large"
    with PeakRSS() as streamed:
        status, headers, body = raw_post(server.port, "/v1/audio/speech", {"Content-Type": "application/json",
                                                                          "Transfer-Encoding": "chunked"},
                                         chunked(150 << 20))
    error = json.loads(body)["error"]
    assert status == 413 and error["param"] == "ref_audio" and "MiB" in error["message"]
    cap = server.app.state.api.body_limit("POST", "/v1/audio/speech")[0]
    print(f"150 MB body refused: peak RSS growth {declared.growth / 2**20:.1f} MiB declared, "
          f"{streamed.growth / 2**20:.1f} MiB chunked (cap {cap / 2**20:.1f} MiB)")
    assert declared.growth < 16 << 20 and streamed.growth < 64 << 20
    assert len(speak(server.client(), "pcm", n=2)) == 2 * 3840  # and the server still speaks


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_only_a_json_body_makes_speech(server, content_type):
    """What a cross-site no-cors fetch or form can send (text/plain, a form) is refused: 415, no audio."""
    body = json.dumps({"model": "m", "voice": "vivian", "input": "Hello.", **frames(2)}).encode()
    headers = {"Content-Length": str(len(body))} | ({"Content-Type": content_type} if content_type else {})
    status, _, reply = raw_post(server.port, "/v1/audio/speech", headers, [body])
    error = json.loads(reply)["error"]
    assert status == 415 and error["code"] == "unsupported_media_type" and "application/json" in error["message"]


def test_the_host_header_is_checked(tiny_bundle):
    """A DNS-rebinding page reaches the server under its own name: refused, with how to allow a name."""
    with Server(tiny_bundle, allowed_hosts=["localhost", "127.0.0.1", "::1"]) as s:
        def get(host: str) -> tuple[int, dict]:
            sock = socket.create_connection(("127.0.0.1", s.port), timeout=10)
            sock.sendall(f"GET /v1/audio/voices HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            data = b""
            while part := sock.recv(65536):
                data += part
            sock.close()
            top, _, body = data.partition(b"\r\n\r\n")
            return int(top.split()[1]), json.loads(body)

        status, body = get("evil.example")
        assert status == 400 and body["error"]["code"] == "invalid_host"
        assert "--allowed-hosts evil.example" in body["error"]["message"]
        assert get(f"127.0.0.1:{s.port}")[0] == 200 and get(f"localhost:{s.port}")[0] == 200
        assert get(f"[::1]:{s.port}")[0] == 200


def test_writes_need_the_key_when_one_is_set(tiny_bundle):
    with Server(tiny_bundle, api_key="s3cret") as s:
        for method, path in (("DELETE", "/v1/audio/voices/x"), ("POST", "/v1/audio/voices")):
            req = urllib.request.Request(f"{s.url}{path}", method=method, data=b"" if method == "POST" else None,
                                         headers={"Content-Type": "multipart/form-data; boundary=b"})
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(req, timeout=10)
            assert e.value.code == 401 and json.loads(e.value.read())["error"]["code"] == "invalid_api_key"


@pytest.mark.parametrize("extra,param,words", [
    ({"max_new_tokens": 10_000_000}, "max_new_tokens", "at most"),
    ({"min_new_tokens": 10_000_000}, "min_new_tokens", "8 frames per text token"),
    ({"instructions": "x" * 2049}, "instructions", "2048"),
    ({"ref_text": "x" * 2049}, "ref_text", "2048"),
])
def test_the_server_decides_how_long_a_request_runs(server, extra, param, words):
    """max_new_tokens: 10000000 got 200 before; now a 400 naming the cap (8 frames per text token + 40)."""
    with pytest.raises(openai.BadRequestError) as e:
        server.client().audio.speech.create(model="m", voice="vivian", input="Hello.", extra_body=extra)
    assert e.value.param == param and words in e.value.message, e.value.message


def test_max_frames_caps_every_request(tiny_bundle):
    with Server(tiny_bundle, max_frames=3) as s:
        c = s.client()
        assert len(c.audio.speech.create(model="m", voice="vivian", input=TEXT, response_format="pcm",
                                         extra_body={"min_new_tokens": 3}).content) == 3 * 3840
        with pytest.raises(openai.BadRequestError) as e:
            c.audio.speech.create(model="m", voice="vivian", input=TEXT, extra_body=frames(4))
        assert e.value.param == "max_new_tokens" and "at most 3 frames" in e.value.message
        assert "--max-frames" in e.value.message


def test_a_client_that_leaves_while_queued_cancels_its_request(tiny_bundle):
    """One place: A speaks, B waits in the queue and gives up after 1 s. B must not run for nobody when A is done
    (before: it ran to its end, or its place was never given back)."""
    import httpx2

    with Server(tiny_bundle, workers=1) as s:
        body = {"model": "m", "voice": "vivian", "input": LONG, "response_format": "pcm"}
        done = threading.Event()

        def first() -> None:
            try:
                with httpx2.Client(timeout=120) as c:
                    assert len(c.post(f"{s.url}/v1/audio/speech", json={**body, **frames(1500)}).content) == 1500 * 3840
            finally:
                done.set()

        a = threading.Thread(target=first)
        a.start()
        while s.health()["busy"] == 0:
            time.sleep(0.01)
        with httpx2.Client(timeout=1.0) as c, pytest.raises(httpx2.TimeoutException):
            c.post(f"{s.url}/v1/audio/speech", json={**body, **frames(2000)})
        assert not done.is_set(), "A finished before B gave up: make A longer"
        a.join(timeout=120)
        t0 = time.monotonic()
        h = s.wait_idle(timeout=1.0)
        print(f"queued client left: workers idle {time.monotonic() - t0:.3f} s after the first request ended")
        assert h["busy"] == 0 and h["queued"] == 0, h
        assert h["served"] == 1  # B never ran


def test_headers_must_arrive_in_time():
    """uvicorn has no header timeout: a connection that sends nothing, or trickles its headers, holds a socket
    for ever. The serve command's protocol drops it."""
    from qwen3_tts_edge.runtime.servers.cli import _h11_with_header_timeout

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="off",
                            http=_h11_with_header_timeout(0.5))
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        silent = socket.create_connection(("127.0.0.1", port), timeout=10)
        slow = socket.create_connection(("127.0.0.1", port), timeout=10)
        ok = socket.create_connection(("127.0.0.1", port), timeout=10)
        ok.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert ok.recv(100).startswith(b"HTTP/1.1 204")
        t0 = time.monotonic()
        for _ in range(4):
            slow.sendall(b"X")  # a byte at a time, never a whole header
            time.sleep(0.2)
        assert silent.recv(10) == b"" and slow.recv(10) == b""  # closed by the server
        assert time.monotonic() - t0 < 3
        assert ok.recv(10) == b""  # an idle keep-alive connection ends too
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def test_voice_names_count_listing_and_leftovers(tmp_path):
    from qwen3_tts_edge.runtime.servers.voices import VoiceExists, VoiceRequestError

    folder = tmp_path / "voices"
    folder.mkdir()
    (folder / "a.voice").write_bytes(b"x")
    (folder / ".b.voice.k2j3h4").write_bytes(b"half written")  # a crash mid-save
    (folder / "..c.voice.x1.y2").write_bytes(b"half written")
    (folder / ".hidden-notes").write_text("not ours")
    catalog = VoiceCatalog([], "base", folder, max_voices=2)
    assert sorted(p.name for p in folder.iterdir()) == [".hidden-notes", "a.voice"]
    with pytest.raises(VoiceRequestError, match="not allowed"):
        catalog.check_new_name("evil\n")  # NAME_RULE.match let a trailing newline through
    with pytest.raises(VoiceRequestError):
        catalog.resolve("a\n")
    assert catalog.saved() == ["a"]
    # The listing is re-read when the folder changes, not per request: a file that appears without the folder's
    # mtime changing is not seen until it does.
    stamp = folder.stat()
    (folder / "b.voice").write_bytes(b"x")
    os.utime(folder, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))
    assert catalog.saved() == ["a"]
    os.utime(folder)
    assert catalog.saved() == ["a", "b"]
    with pytest.raises(VoiceExists, match="at most 2 saved voices"):
        catalog.check_room()
