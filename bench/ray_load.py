"""Ray Serve's cost per request: the same load through ``serve --ray`` (1 and 2 replicas) and plain ``serve``.

    python -m qwen3_tts_edge.bench.ray_load -b BUNDLE [--threads 1] [--max-batch 1] [--frames 50] [--requests 3]

For each setup a server is started in a child process on this machine and measured at 1, 2 and 4 concurrent
streams with ``bench/server_load.py``'s client (pcm read as it streams; time to first byte, total time,
aggregate real-time factor):

- ``serve`` with 1 worker, and with 2 workers (the same total threads as 2 replicas);
- ``serve --ray`` with 1 replica, and with 2 replicas (a new local Ray instance each, ``RAY_ADDRESS=local``:
  the driver, GCS, raylet, controller and HTTP proxy share the machine with the replicas).

On one small machine this measures Ray's overhead, not a speed-up: every chunk of audio crosses two more
processes (replica -> proxy -> client), and Ray's own processes share the cores. ``--interleave N`` measures the
overhead per request alone and fairly on a machine whose load drifts: ``serve`` (1 worker) and ``serve --ray``
(1 replica) run side by side and N requests go to each in turn, one at a time; the difference of the medians
(time to first byte, total time) is Ray's overhead per request.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from .server_load import TEXT, _free_port, frames_body, one_request, run_level, start_server

RAY_START_S = 300
WORKER_NICENESS = 15  # Ray's default for its workers (the replicas); 0 runs them at plain serve's priority


def start_ray_server(bundle: Path, replicas: int, threads: int, max_batch: int, max_queue: int,
                     log: Path | None = None, niceness: int = WORKER_NICENESS) -> tuple[subprocess.Popen, str]:
    """``serve --ray`` on a new local Ray instance; returns once the app answers /health through the proxy."""
    port = _free_port()
    cmd = [sys.executable, "-m", "qwen3_tts_edge.runtime.cli", "serve", "-b", str(bundle.resolve()), "--ray",
           "--replicas", str(replicas), "--threads", str(threads), "--max-batch", str(max_batch), "--port", str(port),
           "--max-queue", str(max_queue), "--log-level", "warning"]
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 (closed with the process)
    # Ray starts its workers (the replicas) at nice 15 unless told: on a machine with other work they get what is left.
    env = {**os.environ, "RAY_ADDRESS": "local", "RAY_worker_niceness": str(niceness)}
    proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + RAY_START_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"serve --ray exited with {proc.returncode}" + (f"; see {log}" if log else ""))
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"serve --ray did not answer within {RAY_START_S} s")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(2)  # Ctrl+C: the Ray driver deletes its app and stops the local Ray it started
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()


def measure(url: str, levels: list[int], requests: int, frames: int, voice: str | None) -> list[dict]:
    with urllib.request.urlopen(f"{url}/v1/audio/voices") as r:
        voice = voice or json.loads(r.read())["voices"][0]["id"]
    body = frames_body({"model": "bench", "input": TEXT, "voice": voice, "response_format": "pcm"}, frames)
    one_request(url, body, None)  # warm-up
    out = []
    for c in levels:
        level = run_level(url, c, requests, body, None)  # server_load's clients, seeds and figures
        lv = {"concurrency": c, "requests": level["requests"], "ok": level["ok"],
              "ttfb_ms": level["ttfb_p50_ms"] if level["ok"] else None,
              "total_ms": level["total_p50_ms"] if level["ok"] else None,
              "wall_s": level["wall_s"], "audio_s": level["audio_s"], "aggregate_rtf": level["aggregate_rtf"]}
        print(f"  {c} stream(s): {lv['ok']}/{lv['requests']} ok, TTFB {lv['ttfb_ms'] or 0:.0f} ms, total "
              f"{lv['total_ms'] or 0:.0f} ms, aggregate RTF {lv['aggregate_rtf'] or float('nan'):.3f}",
              file=sys.stderr)
        out.append(lv)
    return out


def interleave(bundle: Path, n: int, threads: int, max_batch: int, frames: int, voice: str | None,
               log: Path | None, niceness: int = WORKER_NICENESS) -> dict:
    """``n`` requests to plain ``serve`` and ``n`` to ``serve --ray`` (1 replica), alternating, one at a time."""
    plain, plain_url = start_server(bundle, 1, threads, 4, max_batch=max_batch)
    try:
        ray_proc, ray_url = start_ray_server(bundle, 1, threads, max_batch, 4, log, niceness)
        try:
            with urllib.request.urlopen(f"{plain_url}/v1/audio/voices") as r:
                voice = voice or json.loads(r.read())["voices"][0]["id"]
            body = frames_body({"model": "bench", "input": TEXT, "voice": voice, "response_format": "pcm"}, frames)
            runs: dict[str, list[dict]] = {"serve": [], "ray": []}
            for url in (plain_url, ray_url):
                one_request(url, body, None)  # warm-up
            for i in range(n):
                for name, url in (("serve", plain_url), ("ray", ray_url))[:: 1 if i % 2 else -1]:
                    runs[name].append(one_request(url, {**body, "seed": i}, None))
        finally:
            stop(ray_proc)
    finally:
        plain.terminate()
        plain.wait(timeout=30)
    out = {}
    for name, results in runs.items():
        ok = [r for r in results if r["status"] == 200]
        out[name] = {"ok": len(ok), "requests": len(results),
                     "ttfb_ms": statistics.median(r["ttfb_s"] for r in ok) * 1e3,
                     "total_ms": statistics.median(r["total_s"] for r in ok) * 1e3}
    out["overhead_ttfb_ms"] = out["ray"]["ttfb_ms"] - out["serve"]["ttfb_ms"]
    out["overhead_total_ms"] = out["ray"]["total_ms"] - out["serve"]["total_ms"]
    return out


def markdown(meta: dict, rows: list[dict], pair: dict | None = None) -> str:
    lines = [f"# Ray Serve overhead: {meta['bundle']}", "", f"- machine: {meta['machine']}",
             f"- Ray workers' nice value: {meta['worker_niceness']} (plain serve: 0)",
             f"- requests: {meta['frames']} frames ({meta['frames'] * 0.08:.2f} s of audio) each, {meta['requests']} "
             "per stream, pcm read as it streams", f"- command: `{meta['command']}`", "",
             "| setup | streams | ok | TTFB median | total median | aggregate RTF |", "|---|---:|---:|---:|---:|---:|"]
    for row in rows:
        for lv in row["levels"]:
            def fmt(v, spec):
                return "n/a" if v is None else format(v, spec)

            lines.append(f"| {row['setup']} | {lv['concurrency']} | {lv['ok']}/{lv['requests']} | "
                         f"{fmt(lv['ttfb_ms'], '.0f')} ms | {fmt(lv['total_ms'], '.0f')} ms | "
                         f"{fmt(lv['aggregate_rtf'], '.3f')} |")
    if pair:
        lines += ["", f"Interleaved, {pair['serve']['requests']} requests each, one at a time: `serve` TTFB "
                  f"{pair['serve']['ttfb_ms']:.0f} ms / total {pair['serve']['total_ms']:.0f} ms, `serve --ray` TTFB "
                  f"{pair['ray']['ttfb_ms']:.0f} ms / total {pair['ray']['total_ms']:.0f} ms (medians): Ray's overhead "
                  f"per request {pair['overhead_ttfb_ms']:+.0f} ms to first byte, {pair['overhead_total_ms']:+.0f} ms "
                  "in total."]
    by = {row["setup"]: row["levels"][0] for row in rows}
    plain, ray1 = by.get("serve, 1 worker"), by.get("serve --ray, 1 replica")
    if plain and ray1 and plain["ttfb_ms"] and ray1["ttfb_ms"]:
        lines += ["", f"Ray's overhead per request at one stream: time to first byte "
                  f"{ray1['ttfb_ms'] - plain['ttfb_ms']:+.0f} ms, total time "
                  f"{ray1['total_ms'] - plain['total_ms']:+.0f} ms (medians, 1 replica vs 1 worker, the same threads)."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen3_tts_edge.bench.ray_load", description=__doc__.split("\n")[0])
    p.add_argument("-b", "--bundle", type=Path, required=True)
    p.add_argument("--threads", type=int, default=1, help="threads per worker / replica")
    p.add_argument("--max-batch", type=int, default=1, help="streams each engine batches")
    p.add_argument("--concurrency", default="1,2,4")
    p.add_argument("--requests", type=int, default=3, help="requests per stream at each level")
    p.add_argument("--frames", type=int, default=50, help="80 ms frames per request (forced)")
    p.add_argument("--voice")
    p.add_argument("--setups", default="serve1,ray1,serve2,ray2",
                   help="which to run: serve1, serve2 (workers), ray1, ray2 (replicas)")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--ray-log", type=Path, help="write the serve --ray children's output here")
    p.add_argument("--worker-niceness", type=int, default=WORKER_NICENESS,
                   help="nice value of Ray's workers (RAY_worker_niceness; Ray's default 15 yields to any other "
                        "work on the machine, 0 is plain serve's priority)")
    p.add_argument("--interleave", type=int, default=0, metavar="N",
                   help="also send N requests to serve and N to serve --ray (1 replica), alternating")
    args = p.parse_args(argv)
    levels = [int(v) for v in args.concurrency.split(",") if v.strip()]
    queue = max(levels) * args.requests
    rows = []
    for setup in [s.strip() for s in args.setups.split(",") if s.strip()]:
        n = int(setup[-1])
        if setup.startswith("serve"):
            name = f"serve, {n} worker{'s' if n > 1 else ''}"
            proc, url = start_server(args.bundle, n, args.threads, queue, max_batch=args.max_batch)
        else:
            name = f"serve --ray, {n} replica{'s' if n > 1 else ''}"
            proc, url = start_ray_server(args.bundle, n, args.threads, args.max_batch, queue, args.ray_log,
                                         args.worker_niceness)
        print(f"{name}:", file=sys.stderr)
        try:
            rows.append({"setup": name, "levels": measure(url, levels, args.requests, args.frames, args.voice)})
        finally:
            if setup.startswith("serve"):
                proc.terminate()
                proc.wait(timeout=30)
            else:
                stop(proc)
    pair = None
    if args.interleave:
        print("interleaved serve / serve --ray:", file=sys.stderr)
        pair = interleave(args.bundle, args.interleave, args.threads, args.max_batch, args.frames, args.voice,
                          args.ray_log, args.worker_niceness)
    from qwen3_tts_edge.runtime.machine import describe

    d = describe()
    meta = {"bundle": args.bundle.name, "worker_niceness": args.worker_niceness,
            "machine": f"{d.get('cpu')}, {d.get('cores')} cores, {d.get('memory_gb')} GB",
            "frames": args.frames, "requests": args.requests,
            "command": "python -m qwen3_tts_edge.bench.ray_load " + shlex.join(argv or sys.argv[1:])}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows, "interleaved": pair}, indent=2))
    text = markdown(meta, rows, pair)
    if args.markdown:
        args.markdown.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
