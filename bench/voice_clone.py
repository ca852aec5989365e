"""Voice-cloning bench on a Base bundle: voice creation cost and time to first audio per kind of voice.

    python -m qwen3_tts_edge.bench.voice_clone -b BASE_BUNDLE --clip ref.wav --text "what the clip says" \\
        [--clip other.wav --text "..."] [--threads 2] [--repeats 3] [--json F] [--markdown F]

Creation: the speaker encoder path (load, resample, mel, x-vector) and the codec encoder, in ms per second of
reference audio, per clip. Time to first audio (one engine, warm, medians over repeats) for:
- ``x-vector``: an x-vector-only voice, not cached (the prompt layout of a preset speaker: one speaker row);
- ``icl cold``: an in-context voice seen for the first time, without a saved decoder state (a voice file made
  before voices kept one, or by another decoder graph): its whole prompt prefilled and the decoder primed with
  its reference codes (decoding the reference, as the official decodes reference + new codes together);
- ``icl first use``: the same, from a voice file that keeps the decoder's state after its reference (what
  ``voice create`` writes): the state is restored instead of decoding the reference;
- ``icl cached``: the same voice again after another voice spoke in between: its saved voice prefix (role,
  tags, x-vector, transcript) and its primed decoder state are restored, the rest of the prompt prefilled.
An engine without caches (``TTS(prefix_cache=False)``) pays the cold figure on every request.
Random-weight bundles make noise, not speech; their timing is the real one for the shapes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from ..runtime import TTS
from ..runtime.engine.assemble import load_stage
from ..runtime.engine.config import DEFAULT_DECODER_THREADS
from ..runtime.errors import Qwen3TTSEdgeError
from ..runtime.voices.audio_in import load_reference
from .machine import describe as describe_machine

TEXTS = ("The weather is lovely today.", "Please remind me to call my sister at six.",
         "Turning on the kitchen lights now.", "Your package will arrive tomorrow morning.")


class VoiceBenchError(Qwen3TTSEdgeError):
    """A voice bench request that cannot run as asked."""


def _ttfa_ms(tts: TTS, voice, text: str, seed: int) -> tuple[float, int, int]:
    """(time to first audio in ms, prompt positions prefilled, reused) of one short request."""
    with tts.stream(text, voice=voice, max_frames=4, frames_per_text_token=None, seed=seed) as stream:
        for _ in stream:
            pass
    s = stream.stats
    return s.ttfa_s * 1e3, s.prompt_positions_prefilled, s.prompt_positions_reused


def _median(rows: list[tuple[float, int, int]]) -> dict[str, Any]:
    return {"ttfa_ms": statistics.median(r[0] for r in rows), "prefilled": rows[-1][1], "reused": rows[-1][2],
            "runs_ms": [round(r[0], 1) for r in rows]}


def run(bundle: Path, clips: list[tuple[Path, str]], *, threads: int, repeats: int) -> dict[str, Any]:
    tts = TTS(bundle, threads=threads)
    if tts.ids.model_type != "base":
        raise VoiceBenchError(f"{bundle} is a {tts.ids.model_type} bundle; the voice bench needs a Base bundle")
    codec = load_stage("codec_encoder", tts.bundle, "fp32", threads=threads)
    creation = []
    voices = []
    for path, text in clips:
        speaker_ms, codec_ms, total_ms = [], [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            xvec = tts.create_voice(path, x_vector_only=True)  # load, resample, mel, x-vector
            t1 = time.perf_counter()
            voice = tts.create_voice(path, text)  # all of that plus the codec encoder
            t2 = time.perf_counter()
            codec.encode(load_reference(path))  # the codec encoder alone, timed on its own
            t3 = time.perf_counter()
            speaker_ms.append((t1 - t0) * 1e3)
            total_ms.append((t2 - t1) * 1e3)
            codec_ms.append((t3 - t2) * 1e3)  # includes the reference load (a few ms)
        sp, co, tot = (statistics.median(v) for v in (speaker_ms, codec_ms, total_ms))
        seconds = voice.provenance["seconds_24k"]
        creation.append({"clip": path.name, "seconds": round(seconds, 2), "ref_frames": int(len(voice.ref_codes)),
                         "speaker_ms": round(sp, 1), "codec_ms": round(co, 1),
                         "speaker_ms_per_s": round(sp / seconds, 1), "codec_ms_per_s": round(co / seconds, 1),
                         "icl_voice_ms_per_s": round(tot / seconds, 1)})
        voices.append((path.name, voice, xvec))

    _ttfa_ms(tts, voices[0][2], TEXTS[0], 0)  # warm-up: first-call costs stay out of every figure
    ttfa = []
    for name, icl, xvec in voices:
        rows: dict[str, list[tuple[float, int, int]]] = {"x-vector": [], "icl cold": [], "icl first use": [],
                                                          "icl cached": []}
        unsaved = dataclasses.replace(icl, decoder_states={})
        for r in range(repeats):
            text = TEXTS[(r + 1) % len(TEXTS)]
            tts.forget_voices()  # nothing known: both kinds start cold
            rows["x-vector"].append(_ttfa_ms(tts, xvec, text, r))
            tts.forget_voices()
            _ttfa_ms(tts, xvec, TEXTS[0], r)  # the engine is warm and something else is live
            rows["icl cold"].append(_ttfa_ms(tts, unsaved, text, r))
            tts.forget_voices()
            _ttfa_ms(tts, xvec, TEXTS[0], r)
            rows["icl first use"].append(_ttfa_ms(tts, icl, text, r))
            _ttfa_ms(tts, xvec, TEXTS[0], r)  # another voice in between: the ICL prefix comes from the LRU
            rows["icl cached"].append(_ttfa_ms(tts, icl, TEXTS[(r + 2) % len(TEXTS)], r))
        ttfa.append({"clip": name, "ref_frames": int(len(icl.ref_codes)),
                     **{kind: _median(v) for kind, v in rows.items()}})
    saved = tts.talker.saved_bytes / max(1, tts.talker.saved_positions)
    m = tts.bundle.manifest
    return {"bundle": str(bundle), "model": m.source.get("model"), "size": m.model.get("tts_model_size"),
            "talker": tts.talker_precision, "decoder": tts.decoder_precision, "threads": threads, "repeats": repeats,
            "creation": creation, "ttfa": ttfa, "voice_cache_bytes_per_position": round(saved),
            "machine": describe_machine(threads, DEFAULT_DECODER_THREADS)}


def format_markdown(r: dict[str, Any]) -> str:
    lines = [f"## Voice cloning: {r['model']} (talker {r['talker']}, decoder {r['decoder']}, {r['threads']} threads)",
             "", f"Voice creation (median of {r['repeats']}):", "",
             "| clip | seconds | frames | speaker encoder ms (per s) | codec encoder ms (per s) | ICL voice ms per s |",
             "|---|---|---|---|---|---|"]
    for c in r["creation"]:
        lines.append(f"| {c['clip']} | {c['seconds']} | {c['ref_frames']} | {c['speaker_ms']} ({c['speaker_ms_per_s']})"
                     f" | {c['codec_ms']} ({c['codec_ms_per_s']}) | {c['icl_voice_ms_per_s']} |")
    lines += ["", "Time to first audio, ms (median; prompt positions prefilled / reused):", "",
              "| clip | ref frames | x-vector voice | ICL cold | ICL first use (saved decoder state) | ICL cached |",
              "|---|---|---|---|---|---|"]
    for t in r["ttfa"]:
        cells = [f"{t[k]['ttfa_ms']:.0f} ({t[k]['prefilled']}/{t[k]['reused']})" if k in t else "n/a"
                 for k in ("x-vector", "icl cold", "icl first use", "icl cached")]
        lines.append(f"| {t['clip']} | {t['ref_frames']} | " + " | ".join(cells) + " |")
    lines += ["", f"Saved voice prefixes cost {r['voice_cache_bytes_per_position'] / 1e3:.0f} KB per position."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m qwen3_tts_edge.bench.voice_clone", description=__doc__.split("\n")[0])
    p.add_argument("-b", "--bundle", required=True, type=Path)
    p.add_argument("--clip", type=Path, action="append", required=True, help="reference clip (repeatable)")
    p.add_argument("--text", action="append", required=True, help="its transcript (one per --clip)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)
    try:
        if len(args.clip) != len(args.text):
            raise VoiceBenchError("give one --text per --clip")
        report = run(args.bundle, list(zip(args.clip, args.text, strict=True)), threads=args.threads,
                     repeats=args.repeats)
    except Qwen3TTSEdgeError as exc:
        print(f"voice_clone: error: {exc}", file=sys.stderr)
        return 1
    md = format_markdown(report)
    print(md)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    if args.markdown:
        args.markdown.write_text(md, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
