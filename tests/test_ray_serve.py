"""The OpenAI-compatible server as Ray Serve replicas, on a two-node Ray cluster on this machine (loopback only).

One cluster serves the module (``ray.cluster_utils.Cluster``: a head and a second raylet, one CPU each, so two
one-CPU replicas land one per node). The HTTP proxy runs on the head only, so every request enters through one
proxy and its queue is the one the 429 test fills (with a proxy on every node, both bind the same port and the
kernel spreads connections between them). Replicas batch one stream each (``max_batch`` 1), so two concurrent
requests always reach both replicas. Lengths are forced (``min_new_tokens`` = ``max_new_tokens``) as in
``test_server_openai``, and audio is compared byte for byte with plain ``serve`` for the same seed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray", reason="needs Ray Serve: pip install 'qwen3-tts-edge[ray]'")
pytest.importorskip("ray.serve", reason="needs Ray Serve: pip install 'qwen3-tts-edge[ray]'")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from ray import serve  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from conftest import REPO  # noqa: E402
from qwen3_tts_edge.runtime.servers import ray_app  # noqa: E402
from qwen3_tts_edge.runtime.servers.voices import VoiceCatalog  # noqa: E402

FRAME_BYTES = 3840  # one 80 ms frame of 24 kHz s16 pcm
TEXT = "Hello there, this is a test of the speech server."
LONG = " ".join([TEXT] * 25)  # room for 2000+ frames under the runaway guard
APP = "tts"
NICENESS_ENV = "RAY_worker_niceness"  # Ray's setting (read by the raylets it starts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RayCluster:
    """Two raylets on this machine, Serve with its proxy on the head, and helpers to deploy and call the app."""

    def __init__(self):
        # Ray runs its workers (the replicas) at nice 15 by default: on a machine busy with other tests they would
        # get almost no CPU. At the test's own priority they are slowed no more than the rest of the suite.
        os.environ[NICENESS_ENV] = "0"
        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        self.cluster.add_node(num_cpus=1)
        ray.init(address=self.cluster.address, logging_level="WARNING", log_to_driver=False)
        self.port = _free_port()
        serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": self.port})
        self.url = f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
            self.cluster.shutdown()
            os.environ.pop(NICENESS_ENV, None)

    def deploy(self, bundle: Path, *, engine=None, **deploy) -> ray_app.ReplicaOptions:
        options = ray_app.ReplicaOptions(bundle=str(bundle), manifest_sha256=ray_app.manifest_sha256(bundle),
                                         engine={"threads": 1, "max_batch": 1, **(engine or {})})
        serve.run(ray_app.deployment(options, **deploy), name=APP, route_prefix="/")
        return options

    def replica_states(self) -> dict[str, int]:
        return dict(serve.status().applications[APP].deployments[ray_app.DEPLOYMENT_NAME].replica_states)

    def wait_replicas(self, running: int, timeout: float, while_waiting=None) -> float:
        """Seconds until exactly ``running`` replicas run (and none is starting or stopping)."""
        t0 = time.monotonic()
        while True:
            states = self.replica_states()
            if states == {"RUNNING": running}:
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout:
                raise AssertionError(f"replicas did not settle at {running} running within {timeout} s: {states}")
            if while_waiting:
                while_waiting()
            time.sleep(0.5)

    @staticmethod
    def replica_actor(replica: str):
        """The actor of a replica named in an ``X-Replica`` header, or None once it is gone (the actor name is the
        one Ray's Serve fault-tolerance guide kills replicas by)."""
        try:
            return ray.get_actor(f"SERVE_REPLICA::{APP}#{ray_app.DEPLOYMENT_NAME}#{replica}", namespace="serve")
        except ValueError:
            return None

    def kill(self, replica: str) -> None:
        actor = self.replica_actor(replica)
        assert actor is not None, f"no running replica {replica}"
        ray.kill(actor, no_restart=True)

    def client(self, timeout: float = 120, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="test", max_retries=0, timeout=timeout, **kw)


# The two-node cluster tests take ~5 min on 2 idle cores and leave Ray's processes winding down behind them (in one
# full run the next file's server then missed its shutdown deadline): `pytest -m long tests/test_ray_serve.py`.
CLUSTER = pytest.mark.long


@pytest.fixture(scope="module")
def cluster():
    c = RayCluster()
    try:
        yield c
    finally:
        c.close()


@pytest.fixture
def app_gone(cluster):
    """The test's application is deleted afterwards (its replicas drain and free the nodes' CPUs)."""
    yield cluster
    serve.delete(APP)


def speech(client: openai.OpenAI, frames: int, seed: int, text: str = TEXT, *, fmt: str = "pcm", voice: str = "vivian",
           on_start=None, on_bytes=None, out: dict | None = None) -> dict:
    """One streamed request: status, replica, the bytes (or the error that cut them short), timings.
    ``on_start`` is called when the headers are in (the request holds an engine place), ``on_bytes`` at the first
    body part. ``out`` (default: a new dict) is filled as the reply comes in."""
    t0 = time.monotonic()
    out = out if out is not None else {}
    out.update({"status": None, "replica": None, "data": b"", "error": None, "ttfb": None})
    try:
        with client.audio.speech.with_streaming_response.create(
                model="qwen3-tts", voice=voice, input=text, response_format=fmt,
                extra_body={"min_new_tokens": frames, "max_new_tokens": frames, "seed": seed}) as r:
            out["status"], out["replica"] = r.status_code, r.headers.get(ray_app.REPLICA_HEADER)
            if on_start:
                on_start(out)
            for part in r.iter_bytes():
                if out["ttfb"] is None:
                    out["ttfb"] = time.monotonic() - t0
                    if on_bytes:
                        on_bytes(out)
                out["data"] += part
    except openai.APIStatusError as exc:
        out["status"], out["error"], out["headers"] = exc.status_code, exc, exc.response.headers
    except Exception as exc:  # a cut connection: the stream must never look complete
        out["error"] = exc
    out["total"] = time.monotonic() - t0
    return out


def in_thread(fn, *args, **kw) -> tuple[threading.Thread, dict]:
    """``fn(*args, out=box, **kw)`` on a thread; ``box`` fills as the reply comes in."""
    box: dict = {}
    t = threading.Thread(target=fn, args=args, kwargs={**kw, "out": box}, daemon=True)
    t.start()
    return t, box


def plain_serve_audio(bundle: Path, requests: list[tuple[int, int]]) -> list[bytes]:
    """What plain ``serve`` (the same app on uvicorn, one engine of one thread) returns for (frames, seed)."""
    from test_server_openai import Server

    with Server(bundle) as s:
        client = s.client()
        return [speech(client, frames, seed)["data"] for frames, seed in requests]


# ---- without a cluster --------------------------------------------------------------------------------------------

class FakePool:
    def __init__(self, busy=0, closed=False):
        self.busy, self.closed = busy, closed


def test_health_check_fails_on_a_wedged_engine_or_a_closed_pool():
    now, cpu = [100.0], [10.0]
    watch = ray_app.ReplyWatch(app=None, replica="r1", clock=lambda: now[0], cpu=lambda: cpu[0])
    assert ray_app.health_problem(FakePool(busy=0), watch, 60) is None
    now[0] += 500  # idle for long: not wedged, nothing is held
    assert ray_app.health_problem(FakePool(busy=0), watch, 60) is None
    assert ray_app.health_problem(FakePool(busy=2), watch, 60).startswith("2 request(s) hold engines")
    cpu[0] += 400  # a flac reply sends nothing until complete, but its engine computes: not wedged
    assert ray_app.health_problem(FakePool(busy=2), watch, 60) is None
    watch._moved()
    now[0] += 5  # a reply moved 5 s ago
    assert ray_app.health_problem(FakePool(busy=2), watch, 60) is None
    assert "closed" in ray_app.health_problem(FakePool(closed=True), watch, 60)


def test_options_and_flags_are_checked_before_ray_starts(tmp_path, capsys):
    with pytest.raises(ray_app.RayServeError, match="absolute path"):
        ray_app.ReplicaOptions(bundle="artifacts/demo")
    assert ray_app.parse_autoscale("1..4") == (1, 4) and ray_app.parse_autoscale("0..2") == (0, 2)
    for bad in ("4..1", "2", "a..b", "0..0"):
        with pytest.raises(ValueError, match="MIN..MAX"):
            ray_app.parse_autoscale(bad)
    from qwen3_tts_edge.runtime.cli import main

    assert main(["serve", "-b", str(tmp_path), "--replicas", "2"]) == 1
    assert "add --ray" in capsys.readouterr().err


def test_a_shared_voices_folder_keeps_another_replicas_voice_in_progress(tmp_path):
    fresh, stale = tmp_path / ".me.voice.abc123", tmp_path / ".old.voice.def456"
    fresh.write_bytes(b"x")
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 2 * ray_app.STRAY_TEMP_AGE_S,) * 2)
    ray_app.SharedVoiceCatalog([], "base", tmp_path)
    assert fresh.exists() and not stale.exists()
    VoiceCatalog([], "base", tmp_path)  # the single-process catalogue removes every temporary
    assert not fresh.exists()


def test_the_example_serve_config_is_valid_and_builds(tiny_bundle):
    import yaml
    from ray.serve.schema import ServeDeploySchema

    config = yaml.safe_load((REPO / "runtime" / "servers" / "ray_serve.example.yaml").read_text())
    schema = ServeDeploySchema.model_validate(config)
    app = schema.applications[0]
    assert app.import_path == "qwen3_tts_edge.runtime.servers.ray_app:build"
    args = {**app.args, "bundle": str(tiny_bundle), "voices": None}
    built = ray_app.build(args)
    d = built._bound_deployment
    assert d.ray_actor_options["num_cpus"] == 2
    assert d.max_ongoing_requests == 4 and d._deployment_config.max_queued_requests == 8
    assert d._deployment_config.autoscaling_config.max_replicas == 4
    options = d.init_args[0]
    assert options.manifest_sha256 == ray_app.manifest_sha256(tiny_bundle)
    assert options.voice_aliases == {"narrator": "ryan"} and options.default_aliases
    with pytest.raises(ray_app.RayServeError, match="unknown args"):
        ray_app.build({**args, "replica": 2})
    # An alias that cannot work fails where the config is built, before any replica loads the model.
    with pytest.raises(ray_app.RayServeError, match="not a voice of this bundle"):
        ray_app.build({**args, "voice_aliases": {"narrator": "nobody"}})
    with pytest.raises(ray_app.RayServeError, match="hide the preset"):
        ray_app.build({**args, "voice_aliases": {"ryan": "vivian"}})


# ---- on the two-node cluster ----------------------------------------------------------------------------------------

@CLUSTER
def test_two_replicas_on_two_nodes_stream_what_serve_streams(app_gone, tiny_bundle):
    c = app_gone
    c.deploy(tiny_bundle, replicas=2)
    requests = [(60, 7), (40, 11)]
    # The second asks for OpenAI's "alloy": the replicas map it to vivian as serve does (default aliases).
    threads = [in_thread(speech, c.client(), frames, seed, voice=voice)
               for (frames, seed), voice in zip(requests, ("vivian", "alloy"), strict=True)]
    got = []
    for t, box in threads:
        t.join(120)
        got.append(box)
    for (frames, _), r in zip(requests, got, strict=True):
        assert r["status"] == 200 and r["error"] is None and len(r["data"]) == frames * FRAME_BYTES, r
    assert len({r["replica"] for r in got}) == 2, "the two concurrent requests should reach both replicas"
    assert [r["data"] for r in got] == plain_serve_audio(tiny_bundle, requests)


@CLUSTER
def test_every_replica_full_gives_429_with_retry_after_not_a_hang(app_gone, tiny_bundle):
    c = app_gone
    c.deploy(tiny_bundle, replicas=2, proxy_queue=1, retry_after_s=3)
    held = threading.Semaphore(0)
    # flac is sent once complete: each long request holds its replica's one place with one body part at the end.
    # One after the other: with a proxy queue of 1, Ray refuses a request that arrives while another is still
    # being assigned (its queue counts requests on their way to a free replica too).
    running = []
    for seed in (1, 2):
        running.append(in_thread(speech, c.client(timeout=300), 800, seed, LONG, fmt="flac",
                                 on_start=lambda out: held.release()))
        assert held.acquire(timeout=120), ("the long request did not start", running[-1][1].get("error"))
    waiting = in_thread(speech, c.client(timeout=300), 20, 3)  # every replica full: waits in the proxy (1 place)
    time.sleep(0.5)
    refused = speech(c.client(), 20, 4)
    assert refused["status"] == 429 and refused["total"] < 5, refused
    assert refused["headers"]["retry-after"] == "3"
    assert all(t.is_alive() for t, _ in running), "the long requests ended before the proxy queue was full"
    for t, _ in [*running, waiting]:
        t.join(300)
    assert all(box["status"] == 200 and box["error"] is None and box["data"] for _, box in running), \
        [(box["status"], box["error"], len(box["data"]), box.get("total")) for _, box in running]
    assert len({box["replica"] for _, box in running}) == 2
    assert waiting[1]["status"] == 200 and len(waiting[1]["data"]) == 20 * FRAME_BYTES  # accepted, then served


@CLUSTER
def test_a_killed_replica_fails_its_stream_promptly_and_ray_replaces_it(app_gone, tiny_bundle):
    c = app_gone
    c.deploy(tiny_bundle, replicas=2)
    c.wait_replicas(2, 60)
    started = threading.Semaphore(0)
    a = in_thread(speech, c.client(), 2000, 1, LONG, on_bytes=lambda out: started.release())
    assert started.acquire(timeout=60)
    b = in_thread(speech, c.client(timeout=300), 200, 2, LONG, on_bytes=lambda out: started.release())
    assert started.acquire(timeout=60)
    victim, survivor = a[1]["replica"], b[1]["replica"]
    assert victim and survivor and victim != survivor
    killed = time.monotonic()
    c.kill(victim)
    a[0].join(60)
    failed_after = time.monotonic() - killed
    # The killed replica's client sees a cut stream (no final chunk), never a short success.
    assert a[1]["error"] is not None and len(a[1]["data"]) < 2000 * FRAME_BYTES, a[1]
    assert failed_after < 10, failed_after
    b[0].join(300)
    assert b[1]["error"] is None and len(b[1]["data"]) == 200 * FRAME_BYTES  # the other replica's stream
    for seed in (3, 4, 5):  # new requests succeed while Ray replaces the replica
        r = speech(c.client(), 20, seed)
        assert r["status"] == 200 and len(r["data"]) == 20 * FRAME_BYTES, r
    assert c.replica_actor(victim) is None
    c.wait_replicas(2, 120)  # Ray started a new replica in its place
    restarted_after = time.monotonic() - killed
    pair = [in_thread(speech, c.client(), 300, s, LONG) for s in (6, 7)]
    for t, _ in pair:
        t.join(120)
    replicas = {box["replica"] for _, box in pair}
    assert all(box["status"] == 200 and len(box["data"]) == 300 * FRAME_BYTES for _, box in pair), \
        [(box["status"], box["error"], box["replica"], len(box["data"])) for _, box in pair]
    assert survivor in replicas and victim not in replicas and len(replicas) == 2  # the new replica serves
    print(f"killed stream failed after {failed_after:.2f} s; replica replaced after {restarted_after:.1f} s")


@CLUSTER
def test_autoscaling_adds_a_replica_under_load_and_drains_it_when_idle(app_gone, tiny_bundle):
    c = app_gone
    c.deploy(tiny_bundle, autoscale=(1, 2), autoscaling={
        "target_ongoing_requests": 1, "metrics_interval_s": 0.5, "look_back_period_s": 2,
        "upscale_delay_s": 1, "downscale_delay_s": 4})
    c.wait_replicas(1, 60)
    results: list[dict] = []
    stop = threading.Event()
    clients = [3]  # how many clients keep sending

    def client(i: int) -> None:
        n = 0
        while not stop.is_set():
            if i >= clients[0]:
                time.sleep(0.05)
                continue
            # flac (sent once complete): few messages per request, so the load is the engines', not the proxy's
            results.append({**speech(c.client(timeout=300), 100, 100 * i + n, fmt="flac"), "frames": 100})
            n += 1

    workers = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(3)]
    for w in workers:
        w.start()
    try:
        up = c.wait_replicas(2, 90)
        served_by = set()
        deadline = time.monotonic() + 120
        while len(served_by) < 2 and time.monotonic() < deadline:
            served_by = {r["replica"] for r in results[-6:] if r["status"] == 200}
            time.sleep(0.2)
        assert len(served_by) == 2, ("the second replica never served",
                                     [(r["status"], r["error"], r["replica"]) for r in results[-6:]])
        clients[0] = 1  # light load: one stream at a time, still running while a replica drains
        down = c.wait_replicas(1, 90)
    finally:
        stop.set()
        for w in workers:
            w.join(60)
    accepted = [r for r in results if r["status"] != 429]
    assert accepted and all(r["status"] == 200 and r["error"] is None and _flac_frames(r["data"]) == r["frames"]
                            for r in accepted), [(r["status"], r["error"]) for r in accepted if r["error"]]
    print(f"scaled up in {up:.1f} s, down in {down:.1f} s; {len(accepted)} requests served, "
          f"{len(results) - len(accepted)} refused")


def _flac_frames(data: bytes) -> float:
    """80 ms frames in a flac reply (a cut one does not decode whole)."""
    import io

    import soundfile as sf

    return len(sf.read(io.BytesIO(data), dtype="int16")[0]) / (FRAME_BYTES // 2)


@CLUSTER
def test_a_replica_with_another_bundle_refuses_to_start(app_gone, tiny_bundle):
    c = app_gone
    options = ray_app.ReplicaOptions(bundle=str(tiny_bundle), manifest_sha256="0" * 64,
                                     engine={"threads": 1, "max_batch": 1})
    with pytest.raises(RuntimeError, match="failed"):
        serve.run(ray_app.deployment(options, replicas=1), name=APP, route_prefix="/")
    status = serve.status().applications[APP].deployments[ray_app.DEPLOYMENT_NAME]
    assert "is not the one the deployment was made for" in status.message, status.message
    assert "0000000000000000..." in status.message and c.replica_states().get("RUNNING", 0) == 0
    assert ray_app.deployment_failure(APP) and "is not the one" in ray_app.deployment_failure(APP)


@CLUSTER
def test_serve_ray_from_the_command_line(cluster, tiny_bundle):
    """``qwen3-tts-edge serve --ray`` on a running cluster ($RAY_ADDRESS): it deploys, serves, and on Ctrl+C deletes
    its application."""
    exe = str(Path(sys.executable).parent / "qwen3-tts-edge")
    env = {**os.environ, "RAY_ADDRESS": cluster.cluster.address}
    proc = subprocess.Popen([exe, "serve", "-b", str(tiny_bundle), "--ray", "--replicas", "1", "--threads", "1",
                             "--port", str(cluster.port)], stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline, seen = time.monotonic() + 120, []
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            seen.append(line)
            if "through Ray Serve on" in line or (not line and proc.poll() is not None):
                break
        assert "through Ray Serve on" in seen[-1], "".join(seen)
        r = speech(cluster.client(), 30, 1)
        assert r["status"] == 200 and len(r["data"]) == 30 * FRAME_BYTES, r
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert ray_app.APP_NAME not in serve.status().applications
