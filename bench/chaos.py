"""Chaos run: both servers under minutes of mixed, partly hostile traffic, on loopback only.

    python -m qwen3_tts_edge.bench.chaos -b BUNDLE [--minutes 10] [--clients 8] [--seed 0]
        [--json J] [--markdown M]

Starts ``serve`` and ``wyoming`` on 127.0.0.1 (child processes, one thread each) and lets ``--clients`` threads
pick actions at random for ``--minutes``: normal requests, SSE, clients that leave before the first byte or in
the middle of the audio, slow readers, oversized bodies (declared and chunked), requests that must be refused,
Wyoming plain and streamed syntheses, clients that leave mid-audio, bad events, ``describe`` under load.

Every action checks its own answer. An *accepted* request (HTTP 200, a Wyoming ``audio-start``) must either
deliver all its audio and end the way its protocol ends, or be cancelled by its own client; one that ends any
other way is *lost*. An answer the action did not expect (a 500, a hang past the action's deadline, a sequence
that never ends) is a *failure*. Resident memory is sampled every ``--sample-s`` seconds; threads and sockets are
counted with both servers idle after a warm-up (every action once, then ``--warm-up-s`` of the same traffic, so
thread pools have grown to the run's concurrency) and again at the end. The run passes when nothing was lost or
failed, RSS drifted less than 5 % between the first and the last fifth of the run, no thread or socket was left
behind, and ``describe`` always answered within a second (Home Assistant's wait).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import http.client
import json
import os
import random
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import server_load

BYTES_PER_FRAME = 1920 * 2  # 80 ms of 24 kHz s16le mono
MAX_FRAMES = 12  # the servers' cap (--max-frames): every reply is short, so the run is many requests
ACTION_DEADLINE_S = 120.0  # any action still waiting after this long is a hang
DESCRIBE_LIMIT_S = 1.0  # Home Assistant's wait for an answer to describe
DRIFT_LIMIT = 0.05
TEXT = "Good evening. The kitchen lights are off and the front door is locked."
VOICE = "vivian"


@dataclass
class Outcome:
    """One action's end: ``result`` is completed, cancelled (by its own client), refused (an expected error or a
    429 / busy answer), lost or failed; ``accepted`` whether the server had taken the request on."""

    result: str
    accepted: bool = False
    detail: str = ""
    seconds: float | None = None  # describe: how long the answer took


class Unexpected(Exception):
    """An answer the action did not expect: the run's failure list gets its text."""


# -- HTTP ----------------------------------------------------------------------------------------------------------

def _post(port: int, body: bytes | dict, headers: dict | None = None, host: str | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=ACTION_DEADLINE_S)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    if host:
        conn.putrequest("POST", "/v1/audio/speech", skip_host=True)
        conn.putheader("Host", host)
        for k, v in {**hdrs, "Content-Length": str(len(data))}.items():
            conn.putheader(k, v)
        conn.endheaders(data)
    else:
        conn.request("POST", "/v1/audio/speech", body=data, headers=hdrs)
    return conn, conn.getresponse()


def _speech(rng: random.Random, **extra) -> tuple[dict, int]:
    frames = rng.randint(2, MAX_FRAMES)
    return ({"model": "chaos", "input": TEXT, "voice": VOICE, "response_format": "pcm", "seed": rng.randrange(2**31),
             "min_new_tokens": frames, "max_new_tokens": frames, **extra}, frames)


def _refused_or_unexpected(resp: http.client.HTTPResponse, expected: set[int]) -> Outcome:
    data = resp.read()
    if resp.status == 429 and resp.getheader("Retry-After"):
        return Outcome("refused", detail="429")
    if resp.status not in expected:
        raise Unexpected(f"HTTP {resp.status} (expected {sorted(expected)}): {data[:160]!r}")
    error = json.loads(data)["error"]
    if not (isinstance(error, dict) and error.get("message")):
        raise Unexpected(f"HTTP {resp.status} without an OpenAI error object: {data[:160]!r}")
    return Outcome("refused", detail=str(resp.status))


def _speak(ctx: Chaos, rng: random.Random, read: Callable[[http.client.HTTPResponse, int], Outcome],
           **extra) -> Outcome:
    """One speech request; ``read(response, frames)`` takes an accepted one (a 429 is a refusal)."""
    body, frames = _speech(rng, **extra)
    conn, resp = _post(ctx.http_port, body)
    try:
        return read(resp, frames) if resp.status == 200 else _refused_or_unexpected(resp, set())
    finally:
        if conn.sock is not None:  # a client that left mid-audio goes at once, as a closed browser tab does
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()


def _whole(n: int, frames: int, what: str) -> Outcome:
    if n != frames * BYTES_PER_FRAME:
        return Outcome("lost", True, f"{what}: {n} of {frames * BYTES_PER_FRAME} bytes")
    return Outcome("completed", True)


def http_normal(ctx: Chaos, rng: random.Random) -> Outcome:
    return _speak(ctx, rng, lambda resp, frames: _whole(len(resp.read()), frames, "pcm"))


def http_slow_reader(ctx: Chaos, rng: random.Random) -> Outcome:
    def read(resp: http.client.HTTPResponse, frames: int) -> Outcome:
        n = 0
        while data := resp.read(2048):
            n += len(data)
            time.sleep(0.05)
        return _whole(n, frames, "slow reader")

    return _speak(ctx, rng, read)


def http_sse(ctx: Chaos, rng: random.Random) -> Outcome:
    def read(resp: http.client.HTTPResponse, frames: int) -> Outcome:
        events = [json.loads(line[5:]) for line in resp.read().decode().splitlines() if line.startswith("data:")]
        if not events or events[-1]["type"] != "speech.audio.done":
            return Outcome("lost", True, f"SSE ended without speech.audio.done: {events[-1:]}")
        return _whole(sum(len(base64.b64decode(e["audio"])) for e in events if e["type"] == "speech.audio.delta"),
                      frames, "sse")

    return _speak(ctx, rng, read, stream_format="sse")


def http_leave_mid_audio(ctx: Chaos, rng: random.Random) -> Outcome:
    def read(resp: http.client.HTTPResponse, frames: int) -> Outcome:
        resp.read(rng.randint(1, frames * BYTES_PER_FRAME - 1))
        return Outcome("cancelled", True)

    return _speak(ctx, rng, read)


def http_leave_before_reply(ctx: Chaos, rng: random.Random) -> Outcome:
    """Send the request and go: the server must notice while it is queued or preparing, and free its place."""
    body, _ = _speech(rng)
    data = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", ctx.http_port), timeout=10) as s:
        s.sendall(b"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
        time.sleep(rng.uniform(0, 0.3))
    return Outcome("cancelled")  # never saw an answer: whether it was queued or running, it must be let go


def http_oversized(ctx: Chaos, rng: random.Random) -> Outcome:
    """A body over the cap, declared in Content-Length or sent chunked without end: 413, RSS flat."""
    chunked = rng.random() < 0.5
    sock = socket.create_connection(("127.0.0.1", ctx.http_port), timeout=30)
    length = "Transfer-Encoding: chunked" if chunked else f"Content-Length: {64 << 20}"
    sock.sendall(f"POST /v1/audio/speech HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 f"{length}\r\n\r\n".encode())
    stop = threading.Event()

    def send() -> None:
        block = b"x" * (1 << 20)
        try:
            for _ in range(64):
                if stop.is_set():
                    return
                sock.sendall(b"100000\r\n" + block + b"\r\n" if chunked else block)
        except OSError:  # answered and closed
            pass

    sender = threading.Thread(target=send, daemon=True)
    sender.start()
    try:
        head = b""
        while b"\r\n" not in head:
            part = sock.recv(4096)
            if not part:
                raise Unexpected("oversized body: connection closed without an answer")
            head += part
        status = int(head.split()[1])
        if status == 429:
            return Outcome("refused", detail="429")
        if status != 413:
            raise Unexpected(f"oversized body answered {status}")
        return Outcome("refused", detail="413")
    finally:
        stop.set()
        sock.close()
        sender.join(timeout=30)


BAD_REQUESTS: list[tuple[str, Callable[[dict], tuple[bytes | dict, dict, str | None]], set[int]]] = [
    ("unknown voice", lambda b: ({**b, "voice": "nobody"}, {}, None), {400, 404}),
    ("text/plain body", lambda b: (json.dumps(b).encode(), {"Content-Type": "text/plain"}, None), {415}),
    ("frames over the cap", lambda b: ({**b, "max_new_tokens": 10**7, "min_new_tokens": 1}, {}, None), {400}),
    ("not JSON", lambda b: (b'{"input": "Hi', {}, None), {400}),
    ("unknown format", lambda b: ({**b, "response_format": "aac"}, {}, None), {400}),
    ("foreign Host", lambda b: (b, {}, "evil.example"), {400, 403, 421}),
]


def http_bad(ctx: Chaos, rng: random.Random) -> Outcome:
    name, make, expected = rng.choice(BAD_REQUESTS)
    body, headers, host = make(_speech(rng)[0])
    conn, resp = _post(ctx.http_port, body, headers, host)
    try:
        out = _refused_or_unexpected(resp, expected)
        return Outcome(out.result, detail=f"{name}: {out.detail}")
    finally:
        conn.close()


def http_health(ctx: Chaos, rng: random.Random) -> Outcome:
    health = ctx.health()
    if health.get("status") != "ok":
        raise Unexpected(f"/health: {health}")
    return Outcome("completed")


# -- Wyoming -------------------------------------------------------------------------------------------------------

def _wyoming(ctx: Chaos, scenario) -> Outcome:
    from wyoming.client import AsyncTcpClient

    async def main() -> Outcome:
        async with AsyncTcpClient("127.0.0.1", ctx.wyoming_port) as client:
            return await asyncio.wait_for(scenario(client), ACTION_DEADLINE_S)

    try:
        return asyncio.run(main())
    except TimeoutError as exc:
        raise Unexpected("Wyoming: no end of the sequence within the deadline") from exc


async def _read_sequence(client, end: str) -> tuple[list, bool]:
    """Events until ``end`` (or EOF after an error); whether the sequence ended the way the client waits."""
    events = []
    while (event := await client.read_event()) is not None:
        events.append(event)
        if event.type == end:
            return events, True
    return events, any(e.type == "error" for e in events) and end == "audio-stop"


def _audio_ok(events: list, end: str) -> tuple[bool, str]:
    from wyoming.audio import AudioChunk

    types = [e.type for e in events]
    starts, stops = types.count("audio-start"), types.count("audio-stop")
    audio = sum(len(AudioChunk.from_event(e).audio) for e in events if e.type == "audio-chunk")
    good = starts == stops >= 1 and audio > 0 and audio % BYTES_PER_FRAME == 0 and types[-1] == end \
        and audio <= MAX_FRAMES * BYTES_PER_FRAME * starts
    return good, f"{starts} starts, {stops} stops, {audio} bytes, ends {types[-1:]}"


def wyoming_synthesize(ctx: Chaos, rng: random.Random) -> Outcome:
    from wyoming.tts import Synthesize, SynthesizeVoice

    async def scenario(client) -> Outcome:
        await client.write_event(Synthesize(text=TEXT, voice=SynthesizeVoice(name=VOICE)).event())
        events, ended = await _read_sequence(client, "audio-stop")
        if not ended:
            raise Unexpected(f"plain synthesize ended without audio-stop or error+EOF: {[e.type for e in events]}")
        if events[0].type == "error":
            return Outcome("refused", detail="error")
        good, detail = _audio_ok(events, "audio-stop")
        return Outcome("completed" if good else "lost", True, detail)

    return _wyoming(ctx, scenario)


def wyoming_stream(ctx: Chaos, rng: random.Random) -> Outcome:
    """Home Assistant's streamed sequence: start, chunks as an LLM writes them, the compatibility synthesize,
    stop; it reads until synthesize-stopped."""
    from wyoming.tts import Synthesize, SynthesizeChunk, SynthesizeStart, SynthesizeStop, SynthesizeVoice

    async def scenario(client) -> Outcome:
        voice = SynthesizeVoice(name=VOICE)
        await client.write_event(SynthesizeStart(voice=voice).event())
        for word in TEXT.split(" "):
            await client.write_event(SynthesizeChunk(text=word + " ").event())
            await asyncio.sleep(rng.uniform(0, 0.03))
        await client.write_event(Synthesize(text=TEXT, voice=voice).event())
        await client.write_event(SynthesizeStop().event())
        events, ended = await _read_sequence(client, "synthesize-stopped")
        if not ended:
            raise Unexpected(f"stream ended without synthesize-stopped: {[e.type for e in events]}")
        if "audio-start" not in {e.type for e in events}:
            return Outcome("refused", detail="error")
        good, detail = _audio_ok([e for e in events if e.type != "synthesize-stopped"], "audio-stop")
        return Outcome("completed" if good else "lost", True, detail)

    return _wyoming(ctx, scenario)


def wyoming_leave_mid_audio(ctx: Chaos, rng: random.Random) -> Outcome:
    from wyoming.tts import Synthesize, SynthesizeVoice

    async def scenario(client) -> Outcome:
        await client.write_event(Synthesize(text=TEXT, voice=SynthesizeVoice(name=VOICE)).event())
        while (event := await client.read_event()) is not None:
            if event.type == "audio-chunk":
                return Outcome("cancelled", True)  # leaving the block closes the connection
            if event.type in ("error", "audio-stop"):
                return Outcome("refused" if event.type == "error" else "completed", event.type == "audio-stop")
        raise Unexpected("connection closed before any audio or error")

    return _wyoming(ctx, scenario)


BAD_EVENTS = [
    ("synthesize without text", b'{"type": "synthesize", "data": {}}\n'),
    ("voice not a string", b'{"type": "synthesize", "data": {"text": "Hi.", "voice": {"name": 7}}}\n'),
    ("unknown event", b'{"type": "no-such-event", "data": {}}\n'),
    ("payload declared huge", b'{"type": "synthesize", "data": {"text": "Hi."}, "payload_length": 100000000000}\n'),
    ("not JSON", b"\xff\xfe not json\n"),
]


def wyoming_bad(ctx: Chaos, rng: random.Random) -> Outcome:
    """A bad event gets an error and a clean end (the handler never dies); the next connection still works."""
    name, line = rng.choice(BAD_EVENTS)

    async def scenario(client) -> Outcome:
        client._writer.write(line)
        await client._writer.drain()
        events = []
        while (event := await client.read_event()) is not None:
            events.append(event)
            if event.type == "error":
                break
        if not events or events[-1].type != "error":
            raise Unexpected(f"{name}: no error event ({[e.type for e in events]})")
        return Outcome("refused", detail=name)

    return _wyoming(ctx, scenario)


def wyoming_describe(ctx: Chaos, rng: random.Random) -> Outcome:
    from wyoming.info import Describe

    async def scenario(client) -> Outcome:
        t0 = time.perf_counter()
        await client.write_event(Describe().event())
        event = await client.read_event()
        seconds = time.perf_counter() - t0
        if event is None or event.type != "info":
            raise Unexpected(f"describe answered {event and event.type}")
        return Outcome("completed", seconds=seconds)

    return _wyoming(ctx, scenario)


# name -> (weight, action). Normal traffic dominates, as on a real LAN box; every hostile kind recurs all run long.
ACTIONS: dict[str, tuple[int, Callable[[Chaos, random.Random], Outcome]]] = {
    "http normal": (6, http_normal),
    "http sse": (2, http_sse),
    "http leaves mid-audio": (2, http_leave_mid_audio),
    "http leaves before the reply": (2, http_leave_before_reply),
    "http slow reader": (1, http_slow_reader),
    "http oversized body": (1, http_oversized),
    "http refused request": (3, http_bad),
    "http health": (1, http_health),
    "wyoming synthesize": (4, wyoming_synthesize),
    "wyoming stream": (3, wyoming_stream),
    "wyoming leaves mid-audio": (2, wyoming_leave_mid_audio),
    "wyoming bad event": (2, wyoming_bad),
    "wyoming describe": (2, wyoming_describe),
}


# -- the servers ---------------------------------------------------------------------------------------------------

def _proc_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def _threads(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/task"))


def _sockets(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed since the listing
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return n


class Chaos:
    """Both servers on loopback, the traffic, and what it measured."""

    def __init__(self, bundle: Path, clients: int, sample_s: float, seed: int) -> None:
        self.bundle, self.clients, self.sample_s, self.seed = bundle, clients, sample_s, seed
        self.procs: dict[str, subprocess.Popen] = {}
        self.http_port = self.wyoming_port = 0
        self.outcomes: dict[str, Counter] = defaultdict(Counter)
        self.problems: list[str] = []
        self.describe_s: list[float] = []
        self.rss: dict[str, list[tuple[float, float]]] = {"serve": [], "wyoming": []}
        self._lock = threading.Lock()

    # servers
    def start(self) -> None:
        common = ["-b", str(self.bundle), "--threads", "1", "--max-frames", str(MAX_FRAMES), "--log-level", "error"]
        self.http_port, self.wyoming_port = server_load._free_port(), server_load._free_port()
        cli = [sys.executable, "-m", "qwen3_tts_edge.runtime.cli"]
        self.procs["serve"] = subprocess.Popen([*cli, "serve", *common, "--host", "127.0.0.1", "--port",
                                                str(self.http_port), "--max-queue", "4"])
        self.procs["wyoming"] = subprocess.Popen([*cli, "wyoming", *common, "--uri",
                                                  f"tcp://127.0.0.1:{self.wyoming_port}"])
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise SystemExit(f"{name} exited with {proc.returncode} while starting")
            try:
                self.health()
                wyoming_describe(self, random.Random(0))
                return
            except (OSError, Unexpected, http.client.HTTPException):
                time.sleep(0.3)
        raise SystemExit("the servers did not come up within 300 s")

    def stop(self) -> None:
        for proc in self.procs.values():
            proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    def health(self) -> dict:
        conn = http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=10)
        try:
            conn.request("GET", "/health")
            return json.loads(conn.getresponse().read())
        finally:
            conn.close()

    def idle(self, timeout: float = 60.0) -> dict:
        """Wait until the HTTP server has nothing running or queued; its last health."""
        deadline = time.monotonic() + timeout
        while True:
            health = self.health()
            if (health.get("running", 0) == 0 and health.get("queued", 0) == 0) or time.monotonic() > deadline:
                return health
            time.sleep(0.2)

    def counts(self) -> dict[str, dict[str, int]]:
        return {name: {"threads": _threads(p.pid), "sockets": _sockets(p.pid)} for name, p in self.procs.items()}

    # traffic
    def run_action(self, name: str, rng: random.Random) -> None:
        t0 = time.perf_counter()
        try:
            out = ACTIONS[name][1](self, rng)
        except Unexpected as exc:
            out = Outcome("failed", detail=str(exc))
        except (OSError, http.client.HTTPException, ValueError, KeyError) as exc:
            out = Outcome("failed", detail=f"{type(exc).__name__}: {exc}")
        with self._lock:
            self.outcomes[name][out.result] += 1
            self.outcomes[name]["accepted"] += out.accepted
            if out.result in ("lost", "failed"):
                self.problems.append(f"{name}: {out.result}: {out.detail} ({time.perf_counter() - t0:.1f} s)")
            if out.seconds is not None:
                self.describe_s.append(out.seconds)

    def warm_up(self, seconds: float) -> None:
        """Every action once, then ``seconds`` of the run's traffic: thread pools grow to the concurrency they
        will see (and stay there) before the counts are taken, so what grows later is a leak, not a pool."""
        rng = random.Random(self.seed)
        for name in ACTIONS:
            self.run_action(name, rng)
        self.traffic(seconds, sample=False)
        self.outcomes.clear()
        self.problems.clear()
        self.describe_s.clear()

    def traffic(self, seconds: float, sample: bool = True) -> float:
        names = list(ACTIONS)
        weights = [ACTIONS[n][0] for n in names]
        end = time.monotonic() + seconds
        stop = threading.Event()

        def client(i: int) -> None:
            rng = random.Random(self.seed * 1000 + i)
            while time.monotonic() < end:
                self.run_action(rng.choices(names, weights)[0], rng)

        def sampler() -> None:
            t0 = time.monotonic()
            while True:
                for name, proc in self.procs.items():
                    self.rss[name].append((time.monotonic() - t0, _proc_rss_mb(proc.pid)))
                if stop.wait(self.sample_s):
                    return

        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(self.clients)]
        watcher = threading.Thread(target=sampler if sample else stop.wait, daemon=True)
        t0 = time.monotonic()
        watcher.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join(seconds + 2 * ACTION_DEADLINE_S)
            if t.is_alive():
                self.problems.append("a client thread never returned (a hang past every deadline)")
        stop.set()
        watcher.join()
        return time.monotonic() - t0


def drift(samples: list[tuple[float, float]]) -> dict:
    """RSS at the end of the run against its start: medians of the first and last fifth of the samples."""
    values = [mb for _, mb in samples]
    k = max(1, len(values) // 5)
    first, last = statistics.median(values[:k]), statistics.median(values[-k:])
    return {"first_mb": round(first, 1), "last_mb": round(last, 1), "peak_mb": round(max(values), 1),
            "drift": round(last / first - 1, 4), "samples": len(values),
            "series": [[round(t, 1), round(mb, 1)] for t, mb in samples]}


def run(bundle: Path, seconds: float, clients: int, sample_s: float, seed: int, warm_up_s: float = 30.0) -> dict:
    chaos = Chaos(bundle, clients, sample_s, seed)
    chaos.start()
    try:
        chaos.warm_up(warm_up_s)
        chaos.idle()
        time.sleep(1.0)
        before = chaos.counts()
        wall = chaos.traffic(seconds)
        health = chaos.idle()
        after = chaos.counts()
        # Idle pool threads go when the pool is next used after their idle time (anyio's: 10 s), so keep asking
        # /health as a monitoring client would, for up to a minute.
        for _ in range(30):
            if all(after[s][k] <= before[s][k] for s in after for k in after[s]):
                break
            time.sleep(2.0)
            health = chaos.health()
            after = chaos.counts()
        alive = {name: proc.poll() is None for name, proc in chaos.procs.items()}
    finally:
        chaos.stop()
    rss = {name: drift(samples) for name, samples in chaos.rss.items()}
    totals = Counter()
    for c in chaos.outcomes.values():
        totals.update(c)
    leaks = {f"{s} {k}": f"{before[s][k]} -> {after[s][k]}" for s in after for k in after[s]
             if after[s][k] > before[s][k]}
    describe_max = max(chaos.describe_s, default=0.0)
    checks = {
        "no accepted request lost": totals["lost"] == 0,
        "no unexpected answer or hang": totals["failed"] == 0 and not chaos.problems,
        f"RSS drift < {DRIFT_LIMIT:.0%}": all(r["drift"] < DRIFT_LIMIT for r in rss.values()),
        "no thread or socket left behind": not leaks,
        f"describe within {DESCRIBE_LIMIT_S:g} s": describe_max < DESCRIBE_LIMIT_S,
        "both servers alive and idle": all(alive.values()) and health.get("running") == 0
        and health.get("queued") == 0,
    }
    return {"seconds": round(wall, 1), "clients": clients, "seed": seed,
            "actions": {name: dict(c) for name, c in sorted(chaos.outcomes.items())}, "totals": dict(totals),
            "problems": chaos.problems[:50], "rss": rss, "counts_before": before, "counts_after": after,
            "leaks": leaks, "describe_max_s": round(describe_max, 3),
            "describe_p50_s": round(statistics.median(chaos.describe_s), 3) if chaos.describe_s else None,
            "health_after": health, "checks": checks, "passed": all(checks.values())}


def markdown(meta: dict, r: dict) -> str:
    lines = [f"# Chaos run: {meta['bundle']}", "",
             f"- machine: {meta['machine']}",
             f"- {r['seconds']:.0f} s of traffic (after a warm-up) from {r['clients']} clients (seed {r['seed']}), "
             f"both servers on 127.0.0.1 with one thread each, replies capped at {MAX_FRAMES} frames",
             f"- command: `{meta['command']}`", "",
             "| check | result |", "|---|---|"]
    lines += [f"| {name} | {'pass' if ok else '**FAIL**'} |" for name, ok in r["checks"].items()]
    lines += ["", "| action | runs | accepted | completed | cancelled by the client | refused | lost | failed |",
              "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in r["actions"].items():
        runs = sum(v for k, v in c.items() if k != "accepted")
        lines.append(f"| {name} | {runs} | {c.get('accepted', 0)} | {c.get('completed', 0)} | "
                     f"{c.get('cancelled', 0)} | {c.get('refused', 0)} | {c.get('lost', 0)} | {c.get('failed', 0)} |")
    lines += ["", "| server | RSS first fifth | last fifth | peak | drift | threads before / after | sockets "
              "before / after |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, m in r["rss"].items():
        b, a = r["counts_before"][name], r["counts_after"][name]
        lines.append(f"| {name} | {m['first_mb']:.0f} MB | {m['last_mb']:.0f} MB | {m['peak_mb']:.0f} MB | "
                     f"{m['drift']:+.1%} | {b['threads']} / {a['threads']} | {b['sockets']} / {a['sockets']} |")
    lines += ["", f"`describe` answered in {r['describe_p50_s']} s (median), {r['describe_max_s']} s at worst."]
    if r["problems"]:
        lines += ["", "Problems:", *[f"- {p}" for p in r["problems"]]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen3_tts_edge.bench.chaos", description=__doc__.split("\n")[0])
    p.add_argument("-b", "--bundle", type=Path, required=True, help="a bundle with preset speakers (CustomVoice)")
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--sample-s", type=float, default=10.0, help="seconds between RSS samples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--warm-up-s", type=float, default=30.0, help="traffic before the thread and socket counts")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    from ..runtime.machine import describe

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `kill` stops the servers too (run's finally)
    result = run(args.bundle, args.minutes * 60, args.clients, args.sample_s, args.seed, args.warm_up_s)
    d = describe()
    meta = {"bundle": str(args.bundle), "machine": f"{d.get('cpu')}, {d.get('cores')} cores, {d.get('memory_gb')} GB",
            "command": "python -m qwen3_tts_edge.bench.chaos " + shlex.join(argv if argv is not None else sys.argv[1:])}
    text = markdown(meta, result)
    print(text)
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, **result}, indent=1) + "\n")
    if args.markdown:
        args.markdown.write_text(text)
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
