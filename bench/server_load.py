"""Load on the OpenAI-compatible server: time to first byte and aggregate real-time factor at 1, 2, 4 streams.

    python -m qwen3_tts_edge.bench.server_load -b BUNDLE [--workers 2] [--threads 1] [--max-batch 1] [--frames 50]
    python -m qwen3_tts_edge.bench.server_load --url http://127.0.0.1:8880 [--frames 50]

With ``-b`` a server is started (``qwen3-tts-edge serve`` in a child process, so the client's threads do not
share its interpreter) and stopped at the end; with ``--url`` a running one is measured. At each concurrency
level C, C client threads each send ``--requests`` requests one after another (``pcm``, read as it streams).

- time to first byte: from sending the request to the first audio byte, p50 / p95 over the level's requests.
- aggregate real-time factor: the level's wall time / the seconds of audio all its streams delivered (below 1:
  the server as a whole keeps ahead of real time); per-stream RTF is each request's time / its audio seconds.

Random bundles speak noise and may stop at any frame, so ``--frames`` forces every request to exactly that many
80 ms frames (``min_new_tokens`` = ``max_new_tokens``); ``--frames 25,100`` mixes lengths (client i asks for the
i-th, cyclically: 2 s and 8 s replies); a real checkpoint can run with ``--frames 0`` (its own lengths). With
``-b`` the server's CPU time per delivered frame and its peak resident memory are read from /proc. Standard
library only on the client side.
"""

from __future__ import annotations

import argparse
import http.client
import json
import shlex
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

SAMPLE_RATE = 24000
TEXT = ("Good evening. The kitchen lights are off, the front door is locked, and tomorrow will be sunny with a "
        "high of twenty-two degrees.")


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def one_request(url: str, body: dict, api_key: str | None) -> dict:
    """POST /v1/audio/speech and read the pcm as it streams: first-byte time, total time, bytes."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port or 80, timeout=600)
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    t0 = time.perf_counter()
    conn.request("POST", "/v1/audio/speech", body=json.dumps(body), headers=headers)
    resp = conn.getresponse()
    if resp.status != 200:
        detail = resp.read()[:300].decode(errors="replace")
        conn.close()
        return {"status": resp.status, "error": detail}
    first, n = None, 0
    while True:
        data = resp.read1(65536)
        if not data:
            break
        if first is None:
            first = time.perf_counter() - t0
        n += len(data)
    total = time.perf_counter() - t0
    conn.close()
    audio_s = n / 2 / SAMPLE_RATE
    return {"status": 200, "ttfb_s": first, "total_s": total, "bytes": n, "audio_s": audio_s,
            "rtf": total / audio_s if audio_s else None}


def frames_body(body: dict, frames: int) -> dict:
    return {**body, "min_new_tokens": frames, "max_new_tokens": frames} if frames else body


def _proc_cpu_s(pid: int | None) -> float | None:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc), or None."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    import os

    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _proc_peak_mb(pid: int | None) -> float | None:
    """Peak resident memory (VmHWM) of process ``pid`` in MB, or None."""
    if pid is None:
        return None
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_level(url: str, concurrency: int, requests: int, body: dict, api_key: str | None,
              frames: tuple[int, ...] = (), pid: int | None = None) -> dict:
    results: list[dict] = []
    lock = threading.Lock()

    def client(i: int) -> None:
        mine = frames_body(body, frames[i % len(frames)]) if frames else body
        for j in range(requests):
            r = one_request(url, {**mine, "seed": 1000 * i + j}, api_key)
            with lock:
                results.append(r)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(concurrency)]
    cpu0 = _proc_cpu_s(pid)
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    cpu1 = _proc_cpu_s(pid)
    ok = [r for r in results if r["status"] == 200]
    ttfb = [r["ttfb_s"] for r in ok if r["ttfb_s"] is not None]
    audio = sum(r["audio_s"] for r in ok)
    return {"concurrency": concurrency, "requests": len(results), "ok": len(ok),
            "errors": sorted({f"{r['status']}: {r.get('error', '')[:80]}" for r in results if r["status"] != 200}),
            "ttfb_p50_ms": _percentile(ttfb, 0.5) * 1e3, "ttfb_p95_ms": _percentile(ttfb, 0.95) * 1e3,
            "total_p50_ms": _percentile([r["total_s"] for r in ok], 0.5) * 1e3,
            "wall_s": wall, "audio_s": audio, "aggregate_rtf": wall / audio if audio else None,
            "stream_rtf_median": statistics.median([r["rtf"] for r in ok if r["rtf"]]) if ok else None,
            "cpu_ms_per_frame": (cpu1 - cpu0) * 1e3 / (audio / 0.08) if audio and cpu0 is not None and cpu1 else None,
            "peak_rss_mb": _proc_peak_mb(pid)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(bundle: Path, workers: int, threads: int | None, max_queue: int, max_batch: int | None = None,
                 extra: list[str] | None = None) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "qwen3_tts_edge.runtime.cli", "serve", "-b", str(bundle), "--port", str(port),
           "--workers", str(workers), "--max-queue", str(max_queue), "--log-level", "warning", *(extra or [])]
    if threads:
        cmd += ["--threads", str(threads)]
    if max_batch:
        cmd += ["--max-batch", str(max_batch)]
    proc = subprocess.Popen(cmd)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return proc, url
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("server did not come up within 300 s")


def markdown(meta: dict, levels: list[dict]) -> str:
    lines = [f"# Server load: {meta['model']}", "",
             f"- machine: {meta['machine']}",
             f"- server: {meta['server']}",
             f"- requests: {meta['frames_note']}; {meta['requests']} per stream, pcm read as it streams; voice "
             f"{meta['voice']}",
             f"- command: `{meta['command']}`", "",
             "| streams | requests ok | TTFB p50 | TTFB p95 | aggregate RTF | per-stream RTF (median) | audio s "
             "| wall s | CPU ms / frame | peak RSS |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for lv in levels:
        def fmt(v, spec):
            return "n/a" if v is None else format(v, spec)

        lines.append(f"| {lv['concurrency']} | {lv['ok']}/{lv['requests']} | {fmt(lv['ttfb_p50_ms'], '.0f')} ms | "
                     f"{fmt(lv['ttfb_p95_ms'], '.0f')} ms | {fmt(lv['aggregate_rtf'], '.3f')} | "
                     f"{fmt(lv['stream_rtf_median'], '.3f')} | {lv['audio_s']:.1f} | {lv['wall_s']:.1f} | "
                     f"{fmt(lv.get('cpu_ms_per_frame'), '.0f')} | {fmt(lv.get('peak_rss_mb'), '.0f')} MB |")
        if lv["errors"]:
            lines.append(f"|  | errors: {'; '.join(lv['errors'])} |||||||")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen3_tts_edge.bench.server_load", description=__doc__.split("\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-b", "--bundle", type=Path, help="start a server on this bundle")
    src.add_argument("--url", help="measure a running server (http://HOST:PORT)")
    p.add_argument("--workers", type=int, default=2, help="with -b: server workers")
    p.add_argument("--threads", type=int, default=1, help="with -b: CPU threads per worker")
    p.add_argument("--max-batch", type=int, default=1, help="with -b: streams each worker batches")
    p.add_argument("--concurrency", default="1,2,4", help="stream counts to measure")
    p.add_argument("--requests", type=int, default=3, help="requests per stream at each level")
    p.add_argument("--frames", default="50", help="force this many 80 ms frames per request (0: model's own; "
                   "a comma list mixes lengths across clients)")
    p.add_argument("--voice", default=None, help="voice (default: the server's first)")
    p.add_argument("--text", default=TEXT)
    p.add_argument("--api-key")
    p.add_argument("--json", type=Path, help="write the raw results here")
    p.add_argument("--markdown", type=Path, help="write a results table here")
    p.add_argument("--machine", default=None, help="a line describing the machine (for the report)")
    args = p.parse_args(argv)
    levels = [int(v) for v in args.concurrency.split(",") if v.strip()]
    frames = tuple(int(v) for v in str(args.frames).split(",") if v.strip() and int(v))
    proc = None
    url = args.url
    if args.bundle is not None:
        proc, url = start_server(args.bundle, args.workers, args.threads, max_queue=max(levels) * args.requests,
                                 max_batch=args.max_batch)
    try:
        auth = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
        with urllib.request.urlopen(urllib.request.Request(f"{url}/v1/audio/voices", headers=auth)) as r:
            voices = [v["id"] for v in json.loads(r.read())["voices"]]
        with urllib.request.urlopen(f"{url}/health") as r:
            health = json.loads(r.read())
        voice = args.voice or voices[0]
        body = {"model": "bench", "input": args.text, "voice": voice, "response_format": "pcm"}
        one_request(url, frames_body(body, frames[0] if frames else 0), args.api_key)  # warm-up (allocations)
        results = []
        for c in levels:
            lv = run_level(url, c, args.requests, body, args.api_key, frames, proc.pid if proc else None)
            results.append(lv)
            print(f"{c} stream(s): {lv['ok']}/{lv['requests']} ok, TTFB p50 {lv['ttfb_p50_ms']:.0f} ms p95 "
                  f"{lv['ttfb_p95_ms']:.0f} ms, aggregate RTF {lv['aggregate_rtf'] or float('nan'):.3f}, per-stream "
                  f"RTF {lv['stream_rtf_median'] or float('nan'):.3f}", file=sys.stderr)
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
    from qwen3_tts_edge.runtime.machine import describe

    d = describe()
    machine = args.machine or f"{d.get('cpu')}, {d.get('cores')} cores, {d.get('memory_gb')} GB RAM"
    meta = {"model": health.get("model"), "machine": machine, "voice": voice, "requests": args.requests,
            "server": f"{health.get('workers')} worker(s) x {health.get('max_batch', 1)} streams, max queue "
                      f"{health.get('max_queue')}"
                      + (f", {args.threads} thread(s) per worker" if args.bundle is not None else ""),
            "frames_note": (f"{'/'.join(map(str, frames))} frames ({'/'.join(f'{f * 0.08:.2f}' for f in frames)} s of "
                            "audio) each" if frames else "model-decided lengths"),
            "command": "python -m qwen3_tts_edge.bench.server_load " + shlex.join(argv or sys.argv[1:])}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "levels": results}, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown(meta, results))
    print(markdown(meta, results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
