"""Where a loaded engine's memory goes: resident memory per component, file-backed vs anonymous.

    python -m qwen3_tts_edge.bench.memory -b BUNDLE [--talker q8_0] [--decoder fp32] [--predictor-heads int8]
        [--n-ctx 2048] [--json F]

The engine is built piece by piece in this process (talker, code predictor, predictor tables, decoder) and
the resident set is read from ``/proc/self/smaps`` after each piece and after two short requests, split into
file-backed pages (mmapped GGUF / ONNX files) and anonymous memory (heap, KV cache, ONNX Runtime's copies of
initialisers and its arena). Peak is the kernel's high-water mark (VmHWM). Linux only.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.backends import TALKER_CONTEXT

MB = 1e6


def resident() -> dict[str, float]:
    """Resident MB now: total, file-backed (by file name for model files) and anonymous."""
    out: dict[str, float] = {"total": 0.0, "anonymous": 0.0, "libraries": 0.0}
    name = ""
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            head = line.split(maxsplit=5)
            if len(head) >= 5 and "-" in head[0] and ":" in head[3]:  # a mapping's first line
                name = head[5].strip() if len(head) > 5 else ""
            elif line.startswith("Rss:"):
                kb = int(line.split()[1])
                key = ("anonymous" if not name or name.startswith("[") else
                       Path(name).name if name.endswith((".gguf", ".onnx", ".data", ".npy")) else "libraries")
                out[key] = out.get(key, 0.0) + kb * 1e3 / MB
                out["total"] += kb * 1e3 / MB
    return out


def peak_mb() -> float:
    with open("/proc/self/status", encoding="utf-8") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1e3 / MB
    return 0.0


def measure(bundle_dir: Path, talker: str | None, decoder: str | None, n_ctx: int, threads: int,
            predictor_heads: str | None = None) -> dict[str, Any]:
    from ..runtime.bundle import load_bundle
    from ..runtime.engine.assemble import DECODER, GENERATION, assemble
    from ..runtime.engine.config import EngineConfig
    from ..runtime.pipeline import TTS

    steps: list[tuple[str, dict[str, float]]] = [("python + runtime imports", resident())]
    bundle = load_bundle(bundle_dir, verify=False)
    config = EngineConfig(talker_precision=talker, decoder_precision=decoder, n_ctx=n_ctx, threads=threads,
                          decoder_threads=threads, predictor_heads=predictor_heads, verify=False)
    engines = assemble(bundle, config, load=())
    engines.load(GENERATION)
    heads = engines.generation.predictor.heads_precision if hasattr(engines.generation.predictor, "heads_precision") \
        else None
    steps.append((f"talker {engines.talker_precision} + predictor + tables{f' + {heads} heads' if heads else ''} "
                  f"(n_ctx {n_ctx})", resident()))
    engines.load(DECODER)
    steps.append((f"decoder {engines.decoder_precision}", resident()))
    tts = TTS.from_engines(engines)
    speaker = tts.speakers[0] if tts.speakers else None
    voice = None
    if tts.ids.model_type == "base":  # a Base bundle speaks with a voice: an x-vector of zeros will do here
        from ..runtime.prompt import VoicePrompt

        voice = VoicePrompt(speaker_embedding=np.zeros(tts.tables.hidden_size, np.float32))
    for i in range(2):
        with tts.stream("Hello there, this is a short sentence to measure memory with.", speaker=speaker,
                        voice=voice, instruct="A calm voice." if tts.ids.model_type == "voice_design" else None,
                        max_frames=40, frames_per_text_token=None, seed=i) as stream:
            for _ in stream:
                pass
    steps.append(("after two requests (40 frames each)", resident()))
    rows, before = [], {"total": 0.0}
    for label, now in steps:
        delta = {k: round(v - before.get(k, 0.0)) for k, v in now.items() if round(v - before.get(k, 0.0))}
        rows.append({"step": label, "resident_mb": round(now["total"]), "added_mb": delta})
        before = now
    return {"bundle": str(bundle_dir), "talker": engines.talker_precision, "decoder": engines.decoder_precision,
            "predictor_heads": heads,
            "n_ctx": n_ctx, "threads": threads, "steps": rows, "final": {k: round(v) for k, v in steps[-1][1].items()},
            "peak_mb": round(peak_mb())}


def format_markdown(r: dict[str, Any]) -> str:
    lines = [f"Memory of `{r['bundle']}`: talker {r['talker']}, decoder {r['decoder']}, predictor heads "
             f"{r.get('predictor_heads')}, n_ctx {r['n_ctx']} "
             f"(peak {r['peak_mb']} MB)", "", "| step | resident MB | added (MB) |", "|---|---|---|"]
    for s in r["steps"]:
        added = ", ".join(f"{k} {v:+d}" for k, v in s["added_mb"].items() if k != "total")
        lines.append(f"| {s['step']} | {s['resident_mb']} | {added} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen3_tts_edge.bench.memory", description=__doc__.split("\n")[0])
    p.add_argument("-b", "--bundle", required=True, type=Path)
    p.add_argument("--talker")
    p.add_argument("--decoder")
    p.add_argument("--predictor-heads", choices=("f32", "int8"), help="default: the bundle's")
    p.add_argument("--n-ctx", type=int, default=TALKER_CONTEXT)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    report = measure(args.bundle, args.talker, args.decoder, args.n_ctx, args.threads, args.predictor_heads)
    print(format_markdown(report))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
