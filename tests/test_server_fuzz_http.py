"""Fuzzing the HTTP server (hypothesis, bounded in examples and time): whatever a client sends, the answer is
well-formed OpenAI error JSON or audio, never a 500 or a hang, and random bytes as reference audio are a clear
refusal or a voice at bounded memory.

The servers cap every request at 3 frames (``max_frames``), so a body that happens to be valid costs 240 ms of
audio, and every request has a client timeout: a hang fails the example instead of the run.
"""

from __future__ import annotations

import base64
import json
import struct

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx2 = pytest.importorskip("httpx2")
hypothesis = pytest.importorskip("hypothesis")

from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_server_openai import PeakRSS, Server  # noqa: E402

ERROR_STATUSES = {400, 404, 409, 413, 415, 429}
FIELDS = ["model", "input", "voice", "instructions", "response_format", "speed", "stream_format", "language", "seed",
          "greedy", "temperature", "top_p", "top_k", "max_new_tokens", "min_new_tokens", "ref_audio", "ref_text",
          "x_vector_only_mode"]
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

scalars = (st.none() | st.booleans() | st.integers() | st.integers(-2**70, 2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=30))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
# Values near the valid ones, so the fuzzer gets past the first check and reaches the later ones.
plausible = {
    "input": st.text(max_size=60) | st.sampled_from(["Hello.", " ", "\x00", "é" * 5000]) | json_values,
    "voice": st.sampled_from(["vivian", "ryan", "", "Vivian", "evil\n", "../x"]) | st.fixed_dictionaries(
        {"id": json_values}) | json_values,
    "response_format": st.sampled_from(["pcm", "wav", "flac", "mp3", "opus", "aac", ""]) | json_values,
    "stream_format": st.sampled_from(["audio", "sse", "SSE"]) | json_values,
    "language": st.sampled_from(["english", "en", "en-US", "auto", "xx"]) | json_values,
    "speed": st.sampled_from([1, 1.0, 0.25, 4, 0]) | json_values,
    "max_new_tokens": st.integers(-3, 5) | json_values,
    "min_new_tokens": st.integers(-3, 5) | json_values,
    "temperature": st.floats(allow_nan=True) | json_values,
    "top_k": st.integers(-5, 2**64) | json_values,
}
bodies = st.fixed_dictionaries({}, optional={k: plausible.get(k, json_values) for k in FIELDS}) | json_values


@pytest.fixture(scope="module")
def server(tiny_bundle):
    with Server(tiny_bundle, workers=1, max_queue=4, max_frames=3) as s:
        yield s


def check_reply(r: httpx2.Response) -> str:
    """The reply is audio (or SSE ending in done) or an OpenAI error object; returns which."""
    assert r.status_code != 500 and r.status_code < 500 or r.status_code == 503, (r.status_code, r.text[:300])
    if r.status_code in (200, 201):
        kind = r.headers["content-type"]
        if kind.startswith("text/event-stream"):
            events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
            assert events and events[-1]["type"] == "speech.audio.done", events[-1:]
        elif kind.startswith("application/json"):
            assert "id" in r.json()
        else:
            assert kind.startswith("audio/") and len(r.content) > 0
        return "ok"
    assert r.status_code in ERROR_STATUSES, (r.status_code, r.text[:300])
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and isinstance(error["message"], str)
    assert error["message"] and len(error["message"]) < 2000  # a message never grows with the request
    assert error["param"] is None or isinstance(error["param"], str)
    return "error"


@FUZZ
@given(body=bodies)
@example(body={"input": "Hello.", "voice": "vivian", "response_format": "pcm"})
@example(body={"input": "Hello.", "stream_format": "sse", "response_format": "wav"})
@example(body={"input": "Hello.", "temperature": float("nan"), "top_k": 2**80, "seed": -1})
@example(body={"input": "Hello.", "seed": 2**200, "max_new_tokens": 10**9})
@example(body=[{"input": "Hello."}])
def test_random_json_bodies_get_audio_or_an_openai_error(server, body):
    data = json.dumps(body).encode()  # NaN and Infinity go out as JSON's common extension, as clients send them
    with httpx2.Client(timeout=30) as c:
        check_reply(c.post(f"{server.url}/v1/audio/speech", content=data,
                           headers={"Content-Type": "application/json"}))


@FUZZ
@given(raw=st.binary(max_size=300) | st.text(max_size=200).map(str.encode),
       content_type=st.sampled_from(["application/json", "application/json; charset=latin-1", "text/plain", ""]))
@example(raw=b'{"input": "\\ud800 lone surrogate", "voice": "vivian"}', content_type="application/json")
@example(raw=b"[" * 100_000, content_type="application/json")
@example(raw=b'{"input": "Hi.", "input": "twice"}', content_type="application/json")
def test_random_bytes_as_the_body(server, raw, content_type):
    headers = {"Content-Type": content_type} if content_type else {}
    with httpx2.Client(timeout=30) as c:
        check_reply(c.post(f"{server.url}/v1/audio/speech", content=raw, headers=headers))
    with httpx2.Client(timeout=30) as c:
        assert c.get(f"{server.url}/health").json()["status"] == "ok"


def wav_header(rate: int, channels: int, bits: int, data_size: int) -> bytes:
    block = max(1, channels * bits // 8)
    return (b"RIFF" + struct.pack("<I", (36 + data_size) & 0xFFFFFFFF) + b"WAVEfmt "
            + struct.pack("<IHHIIHH", 16, 1, channels, rate, (rate * block) & 0xFFFFFFFF, block, bits)
            + b"data" + struct.pack("<I", data_size))


# Random bytes, and random bytes behind plausible headers (a WAV declaring any rate, channel count and size; the
# magic numbers of FLAC, Ogg and MP3), so the decoder is reached and not only the format sniffing.
clips = (st.binary(max_size=4096)
         | st.builds(lambda rate, ch, bits, size, tail: wav_header(rate, ch, bits, size) + tail,
                     st.integers(1, 400_000), st.integers(1, 64), st.sampled_from([8, 16, 24, 32]),
                     st.integers(0, 2**32 - 1), st.binary(max_size=8192))
         | st.builds(lambda magic, tail: magic + tail, st.sampled_from([b"fLaC", b"OggS", b"ID3\x03", b"\xff\xfb"]),
                     st.binary(max_size=4096)))


@pytest.fixture(scope="module")
def base_server(base_bundle, tmp_path_factory):
    with Server(base_bundle, workers=1, max_queue=4, max_frames=3,
                voices=tmp_path_factory.mktemp("fuzz-voices")) as s:
        yield s


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)
@given(clip=clips, upload=st.booleans())
@example(clip=wav_header(100, 1, 16, 2**32 - 2) + b"\x10\x20" * 4000, upload=False)  # 10^9 samples at 24 kHz
@example(clip=wav_header(8000, 64, 32, 2**32 - 2) + bytes(8192), upload=True)
def test_random_bytes_as_reference_audio(base_server, clip, upload):
    with httpx2.Client(timeout=60) as c:
        if upload:
            r = c.post(f"{base_server.url}/v1/audio/voices", files={"audio_sample": ("clip.wav", clip)},
                       data={"name": "fuzzed", "ref_text": "Hello there."})
            if r.status_code == 201:
                assert c.delete(f"{base_server.url}/v1/audio/voices/fuzzed").status_code == 200
        else:
            r = c.post(f"{base_server.url}/v1/audio/speech", json={"input": "Hello.", "response_format": "pcm",
                                                                   "ref_audio": base64.b64encode(clip).decode()})
    if check_reply(r) == "error":
        assert r.json()["error"]["param"] in ("ref_audio", "audio_sample"), r.text[:300]


def test_reference_fuzzing_holds_memory_flat(base_server):
    """The reference fuzz run again under an RSS sampler: clips that declare 10^9 samples or 64 channels are
    refused from their headers, so the server's peak memory hardly moves."""
    with PeakRSS() as rss:
        test_random_bytes_as_reference_audio(base_server)
    print(f"reference-audio fuzz: peak RSS growth {rss.growth / 2**20:.1f} MiB over {60} examples")
    assert rss.growth < 128 << 20
