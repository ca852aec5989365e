"""Many streams, one engine: the batched server against the worker pool on the same cores, 1 to 8 streams.

    python -m qwen3_tts_edge.bench.batching -b BUNDLE [--talker-precision q4_k_m] [--frames 25,100]
        [--concurrency 1,2,4,8] [--requests 2] [--json J] [--markdown M] [--plot P]

Starts ``qwen3-tts-edge serve`` once per configuration and measures it with ``bench/server_load.py`` (same
requests, same seeds): *pool* is today's ``--workers 2 --threads 1 --max-batch 1`` (two engines, one request
each), *batched* is ``--workers 1 --threads 2 --max-batch N`` (one engine, N streams batched frame by frame).
Per level: time to first audio p50/p95, aggregate RTF (wall time / all the audio delivered), per-stream RTF,
server CPU ms per delivered frame and peak RSS; then the ratios the continuous-batching issue asks about.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from . import server_load

CONFIGS = {
    "pool": {"workers": 2, "threads": 1, "max_batch": 1},
    "batched": {"workers": 1, "threads": 2, "max_batch": 4},
}


def measure(bundle: Path, name: str, cfg: dict, levels: list[int], requests: int, frames: tuple[int, ...],
            extra: list[str]) -> dict:
    proc, url = server_load.start_server(bundle, cfg["workers"], cfg["threads"], max_queue=max(levels) * requests,
                                         max_batch=cfg["max_batch"], extra=extra)
    try:
        body = {"model": "bench", "input": server_load.TEXT, "voice": _first_voice(url), "response_format": "pcm"}
        server_load.one_request(url, server_load.frames_body(body, frames[0]), None)  # warm-up
        out = []
        for c in levels:
            lv = server_load.run_level(url, c, requests, body, None, frames, proc.pid)
            print(f"{name} {c} stream(s): {lv['ok']}/{lv['requests']} ok, TTFA p50 {lv['ttfb_p50_ms']:.0f} p95 "
                  f"{lv['ttfb_p95_ms']:.0f} ms, aggregate RTF {lv['aggregate_rtf'] or float('nan'):.3f}, "
                  f"{lv['cpu_ms_per_frame'] or float('nan'):.0f} CPU ms/frame, peak {lv['peak_rss_mb'] or 0:.0f} MB",
                  file=sys.stderr)
            out.append(lv)
        return {"config": cfg, "levels": out}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def _first_voice(url: str) -> str:
    import urllib.request

    with urllib.request.urlopen(f"{url}/v1/audio/voices") as r:
        return json.loads(r.read())["voices"][0]["id"]


def summary(results: dict[str, dict]) -> dict:
    """Per level: the batched engine's throughput over the pool's, and its first-audio p95 (the issue's targets)."""
    pool = {lv["concurrency"]: lv for lv in results["pool"]["levels"]}
    out = {}
    for lv in results["batched"]["levels"]:
        p = pool.get(lv["concurrency"])
        if p and p["aggregate_rtf"] and lv["aggregate_rtf"]:
            out[lv["concurrency"]] = {"throughput_vs_pool": round(p["aggregate_rtf"] / lv["aggregate_rtf"], 3),
                                      "ttfa_p95_ms": round(lv["ttfb_p95_ms"]),
                                      "pool_ttfa_p95_ms": round(p["ttfb_p95_ms"]),
                                      "peak_rss_mb": lv["peak_rss_mb"], "pool_peak_rss_mb": p["peak_rss_mb"],
                                      "errors": lv["errors"] + p["errors"]}
    return out


def markdown(meta: dict, results: dict[str, dict], ratios: dict) -> str:
    lines = [f"# Many streams, one engine: {meta['bundle']}", "",
             f"- machine: {meta['machine']}",
             f"- requests: {meta['frames']} frames each (clients alternate), {meta['requests']} per stream, pcm read "
             "as it streams",
             f"- command: `{meta['command']}`", "",
             "| engine | streams | ok | TTFA p50 | TTFA p95 | aggregate RTF | per-stream RTF | CPU ms / frame | "
             "peak RSS |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in results.items():
        c = r["config"]
        label = f"{name} ({c['workers']}x{c['threads']} threads, batch {c['max_batch']})"
        for lv in r["levels"]:
            def f(v, spec):
                return "n/a" if v is None else format(v, spec)
            lines.append(f"| {label} | {lv['concurrency']} | {lv['ok']}/{lv['requests']} | "
                         f"{f(lv['ttfb_p50_ms'], '.0f')} ms | {f(lv['ttfb_p95_ms'], '.0f')} ms | "
                         f"{f(lv['aggregate_rtf'], '.3f')} | "
                         f"{f(lv['stream_rtf_median'], '.3f')} | {f(lv['cpu_ms_per_frame'], '.0f')} | "
                         f"{f(lv['peak_rss_mb'], '.0f')} MB |")
    lines += ["", "| streams | batched throughput / pool | batched TTFA p95 | pool TTFA p95 | batched peak RSS | "
              "errors |", "|---:|---:|---:|---:|---:|---|"]
    for c, s in ratios.items():
        lines.append(f"| {c} | {s['throughput_vs_pool']:.2f}x | {s['ttfa_p95_ms']} ms | {s['pool_ttfa_p95_ms']} ms | "
                     f"{s['peak_rss_mb']:.0f} MB | {'; '.join(s['errors']) or 'none'} |")
    return "\n".join(lines) + "\n"


def plot(results: dict[str, dict], path: Path) -> None:
    from .plots import require_matplotlib

    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    for name, r in results.items():
        xs = [lv["concurrency"] for lv in r["levels"]]
        a.plot(xs, [1 / lv["aggregate_rtf"] if lv["aggregate_rtf"] else 0 for lv in r["levels"]], "o-", label=name)
        b.plot(xs, [lv["ttfb_p95_ms"] / 1e3 for lv in r["levels"]], "o-", label=f"{name} p95")
        b.plot(xs, [lv["ttfb_p50_ms"] / 1e3 for lv in r["levels"]], "o--", label=f"{name} p50", alpha=0.6)
    a.set(xlabel="concurrent streams", ylabel="audio seconds per wall second", title="throughput (1/aggregate RTF)")
    b.set(xlabel="concurrent streams", ylabel="seconds", title="time to first audio", yscale="log")
    for ax in (a, b):
        ax.grid(alpha=0.3)
        ax.legend()
        ax.set_xticks(xs)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen3_tts_edge.bench.batching", description=__doc__.split("\n")[0])
    p.add_argument("-b", "--bundle", type=Path, required=True)
    p.add_argument("--talker-precision", default=None)
    p.add_argument("--predictor-precision", default=None)
    p.add_argument("--decoder-precision", default=None)
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--requests", type=int, default=2, help="requests per stream at each level")
    p.add_argument("--frames", default="25,100", help="frames per request, alternating across clients")
    p.add_argument("--max-batch", type=int, default=CONFIGS["batched"]["max_batch"])
    p.add_argument("--only", choices=tuple(CONFIGS), help="measure one configuration")
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    p.add_argument("--plot", type=Path)
    args = p.parse_args(argv)
    levels = [int(v) for v in args.concurrency.split(",")]
    frames = tuple(int(v) for v in args.frames.split(","))
    extra = [flag for name, value in (("--talker-precision", args.talker_precision),
                                      ("--predictor-precision", args.predictor_precision),
                                      ("--decoder-precision", args.decoder_precision)) if value
             for flag in (name, value)]
    configs = {name: dict(cfg) for name, cfg in CONFIGS.items() if args.only in (None, name)}
    if "batched" in configs:
        configs["batched"]["max_batch"] = args.max_batch
    results = {name: measure(args.bundle, name, cfg, levels, args.requests, frames, extra)
               for name, cfg in configs.items()}
    from ..runtime.machine import describe

    d = describe()
    meta = {"bundle": str(args.bundle), "machine": f"{d.get('cpu')}, {d.get('cores')} cores, {d.get('memory_gb')} GB",
            "frames": "/".join(map(str, frames)), "requests": args.requests,
            "command": "python -m qwen3_tts_edge.bench.batching " + shlex.join(argv or sys.argv[1:])}
    ratios = summary(results) if len(results) == 2 else {}
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "results": results, "summary": ratios}, indent=2))
    text = markdown(meta, results, ratios)
    if args.markdown:
        args.markdown.write_text(text)
    if args.plot:
        plot(results, args.plot)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
