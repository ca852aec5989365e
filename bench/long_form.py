"""``bench --long-form SECONDS``: one multi-minute stream per configuration, timed window by window.

The 50-frame requests of the bench say little about a long reading: the runtime splits long text into segments
(runtime/segments.py, the default budget of ``runtime/plan.segment_budget``: about 240 text tokens at n_ctx 2048),
each a fresh talker context whose KV cache, and so the talker's reads per step, grow with every frame of the
segment. This module makes the long request and turns its chunks into figures:

- the text: the sentences of one bench text (``de-long``), repeated in a rotating order until it holds the text
  tokens the audio needs, spoken in that text's language;
- equal work whatever the sampler does: EOS is held back (random weights say it at random) and each segment ends
  at :data:`FRAMES_PER_TEXT_TOKEN` frames per text token of its own (the runtime's text ceiling, its slack set to
  0), about a trained voice's pace, so segments last as long as a real reading's would; the request ends at
  ``SECONDS`` of audio (``max_frames``), the segment budget is the runtime's default for the bundle's context;
- the timeline: after every chunk the worker notes the chunk's ``elapsed_s``, its audio, the stream's cumulative
  ``StreamStats`` stage times, the process CPU time and VmRSS. A chunk belongs to the window of the audio
  timeline its first sample falls in (windows of ``--long-form-window`` seconds, the last one possibly shorter);
  a window's wall time runs from the previous window's last chunk (the request's start for the first: prompt
  building, prefill and first audio included) to its own last chunk, so the windows' wall times add up to the
  request's and their audio to its audio.

Torch-free; the worker side runs inside ``bench/timing.py``'s fresh process.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from typing import Any

SOURCE_TEXT = "de-long"  # the bench text whose sentences make the long text (the one with the most sentences)
# Frames per text token each segment makes. A trained voice reads about 140 words a minute; de-long is 47 words
# in 86 tokens (Qwen tokenizer), i.e. ~20 s = ~250 frames for 86 tokens: ~3 frames per token. A segment of the
# default ~240 tokens then lasts ~58 s, as a real reading's would (random weights would run to the runtime's
# 8-per-token guard instead, 2.7x longer segments and deeper KV reads than a trained model ever makes).
FRAMES_PER_TEXT_TOKEN = 3.0
DEFAULT_WINDOW_S = 30.0
STAGES = ("talker", "predictor", "decoder", "host")
HOW = ("one request per configuration in a fresh worker process after the timed rounds (same load, warm-up and "
       "engine settings; no PyTorch reference): the sentences of the bench text {source} repeated in a rotating "
       "order, split into segments by the runtime's default budget; EOS held back, each segment ends at {rate:g} "
       "frames per text token of its own (about a trained voice's pace), the request at the asked seconds of audio. "
       "Windows of the audio timeline: a chunk counts in the window its first sample falls in; a window's wall time "
       "runs from the previous window's last chunk (the request's start for the first) to its own last chunk; "
       "stage ms per frame are the StreamStats sums over the window's frames; rss_mb = VmRSS sampled after every "
       "chunk (start: just before the request)")


# ----------------------------------------------------------------------------------------------------------
# the request (parent side)


def long_text(sentences: Sequence[str], count_tokens: Callable[[str], int], tokens: int) -> str:
    """``sentences`` joined in a rotating order (pass i starts at sentence i) until the text has ``tokens`` tokens."""
    parts = [s.strip() for s in sentences if s.strip()]
    if not parts:
        raise ValueError("no sentences to build a long text from")
    text, n = "", 0
    while count_tokens(text) < tokens:
        k = n % len(parts)
        rotation = parts[k:] + parts[:k]
        text = " ".join([text, *rotation]).strip()
        n += 1
    return text


def text_tokens_needed(seconds: float, frame_s: float) -> int:
    """Text tokens the long text needs for ``seconds`` of audio at the forced pace, with a margin of 10 %."""
    return int(math.ceil(seconds / frame_s / FRAMES_PER_TEXT_TOKEN * 1.1)) + 8


# ----------------------------------------------------------------------------------------------------------
# the worker side (inside bench/timing.py's process)


def speak_options(spec: dict[str, Any], total_frames: int, segment_tokens: int | None):
    """The long request's options: EOS held back, ``FRAMES_PER_TEXT_TOKEN`` per segment, ``total_frames`` in all."""
    from ..runtime.pipeline import SpeakOptions

    lf = spec["long_form"]
    return SpeakOptions(language=lf["language"], speaker=spec.get("speaker"), instruct=spec.get("instruct"),
                        seed=int(spec["seed"]), chunk_frames=tuple(spec["chunk_frames"]),
                        min_frames=total_frames, max_frames=total_frames, frames_per_text_token=FRAMES_PER_TEXT_TOKEN,
                        text_ceiling_slack=0, repeat_frames=None, segment_tokens=segment_tokens)


def run(tts: Any, spec: dict[str, Any], rss_mb: Callable[[], dict[str, float]]) -> dict[str, Any]:
    """Speak the long text once; the figures of the stream and its chunk marks reduced to windows."""
    from ..runtime.pipeline import SpeakOptions

    lf = spec["long_form"]
    frame_s = int(tts.bundle.manifest.audio["samples_per_frame"]) / tts.sample_rate
    total_frames = max(1, round(float(lf["seconds"]) / frame_s))
    # The runtime's own default segment budget for this context (what `speak` would use for this text).
    budget = tts._segment_budget(SpeakOptions(instruct=spec.get("instruct")))
    options = speak_options(spec, total_frames, budget)
    start = rss_mb()
    marks: list[dict[str, Any]] = []
    samples = 0
    cpu0 = time.process_time()
    stream = tts.stream(lf["text"], options)
    for chunk in stream:
        st = stream.stats
        marks.append({"start_s": samples / tts.sample_rate, "audio_s": len(chunk.pcm) / tts.sample_rate,
                      "elapsed_s": chunk.elapsed_s, "frames": st.frames, "n_frames": chunk.n_frames,
                      "segment": chunk.segment, "cpu_s": time.process_time() - cpu0, "rss_mb": rss_mb().get("rss"),
                      **{f"{k}_ms": getattr(st, f"{k}_ms") for k in STAGES}})
        samples += len(chunk.pcm)
    cpu = time.process_time() - cpu0
    end = rss_mb()
    st = stream.stats
    n = max(st.frames, 1)
    rss_seen = [x for x in [start.get("rss"), *(m["rss_mb"] for m in marks), end.get("rss")] if x is not None]
    wins = windows(marks, float(lf["window_s"]))
    return {
        "audio_s": st.audio_s, "wall_s": st.total_s, "rtf": st.rtf, "frames": st.frames,
        "ttfa_ms": None if st.ttfa_s is None else st.ttfa_s * 1e3, "prefill_ms": st.prefill_ms,
        "ms_per_frame": st.per_frame_ms(), "cpu_ms_per_frame": cpu * 1e3 / n, "stop_reason": st.stop_reason,
        "n_ctx": tts.n_ctx, "segment_tokens": budget, "segments": st.segments,
        "segment_frames": list(st.segment_frames), "segment_stops": list(st.segment_stops),
        "rss_mb": {"start": start.get("rss"), "peak": max(rss_seen) if rss_seen else None, "end": end.get("rss"),
                   "process_peak": end.get("peak")},
        "rtf_first_window": wins[0]["rtf"] if wins else None, "rtf_last_window": wins[-1]["rtf"] if wins else None,
        "windows": wins, "chunks": len(marks),
    }


def windows(marks: list[dict[str, Any]], window_s: float) -> list[dict[str, Any]]:
    """Chunk marks (cumulative stage times, in stream order) reduced to windows of the audio timeline.

    A chunk goes to the window its first sample falls in (a chunk without audio, the final flush, to the window
    of the chunk before it); a window's figures are differences of the cumulative marks between its last chunk
    and the previous window's last chunk, so they add up to the request's.
    """
    groups: dict[int, list[dict[str, Any]]] = {}
    last = 0
    for m in marks:
        if m["audio_s"] > 0:
            last = int(m["start_s"] // window_s + 1e-9)
        groups.setdefault(last, []).append(m)
    zero = {"elapsed_s": 0.0, "frames": 0, "cpu_s": 0.0, **{f"{k}_ms": 0.0 for k in STAGES}}
    out, before = [], zero
    for i in sorted(groups):
        ms = groups[i]
        after = ms[-1]
        audio = sum(m["audio_s"] for m in ms)
        wall = after["elapsed_s"] - before["elapsed_s"]
        frames = after["frames"] - before["frames"]
        per = max(frames, 1)
        out.append({
            "index": i, "start_s": i * window_s, "audio_s": audio, "wall_s": wall,
            "rtf": wall / audio if audio else None,
            "first_frame": before["frames"], "frames": frames,
            "segments": [ms[0]["segment"], after["segment"]],
            "ms_per_frame": {k: (after[f"{k}_ms"] - before[f"{k}_ms"]) / per for k in STAGES},
            "cpu_ms_per_frame": (after["cpu_s"] - before["cpu_s"]) * 1e3 / per, "rss_mb": after["rss_mb"],
        })
        before = after
    return out


# ----------------------------------------------------------------------------------------------------------
# tables


def _f(v: float | None, fmt: str) -> str:
    return "n/a" if v is None else format(v, fmt)


def _config(run: dict[str, Any]) -> str:
    from .report import talker_label

    return f"{talker_label(run)} + {run['decoder']} ({run['provider'].removesuffix('ExecutionProvider')})"


def _segments(run: dict[str, Any]) -> str:
    frames = run.get("segment_frames") or []
    return f"{run['segments']} ({', '.join(str(f) for f in frames)})"


def markdown_table(section: dict[str, Any]) -> str:
    """One row per configuration: the whole stream, its first and last window, memory at its start, peak, end."""
    w = section["window_s"]
    head = (f"| configuration | audio s | wall s | RTF | RTF first {w:g} s | RTF last window | TTFA ms "
            "| ms/frame talker first / last window | segments (frames each) | RSS MB start / peak / end |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in section["runs"]:
        wins = r["windows"]
        t0 = wins[0]["ms_per_frame"]["talker"] if wins else None
        t1 = wins[-1]["ms_per_frame"]["talker"] if wins else None
        rss = r["rss_mb"]
        lines.append(f"| {_config(r)} | {_f(r['audio_s'], '.1f')} | {_f(r['wall_s'], '.1f')} | {_f(r['rtf'], '.2f')} "
                     f"| {_f(r['rtf_first_window'], '.2f')} | {_f(r['rtf_last_window'], '.2f')} "
                     f"({_f(wins[-1]['audio_s'] if wins else None, '.0f')} s) | {_f(r['ttfa_ms'], '.0f')} "
                     f"| {_f(t0, '.1f')} / {_f(t1, '.1f')} | {_segments(r)} "
                     f"| {_f(rss['start'], '.0f')} / {_f(rss['peak'], '.0f')} / {_f(rss['end'], '.0f')} |")
    return "\n".join(lines)


def windows_table(section: dict[str, Any]) -> str:
    """Every window of every configuration: RTF and per-stage ms per frame along the audio timeline."""
    head = ("| configuration | audio window s | segments | RTF | ms/frame talker | predictor | decoder | host "
            "| CPU ms/frame | RSS MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in section["runs"]:
        for win in r["windows"]:
            ms = win["ms_per_frame"]
            a, b = win["segments"]
            stages = " | ".join(_f(ms[k], ".1f") for k in STAGES)
            lines.append(f"| {_config(r)} | {win['start_s']:g}-{win['start_s'] + win['audio_s']:.1f} "
                         f"| {a if a == b else f'{a}-{b}'} | {_f(win['rtf'], '.2f')} | {stages} "
                         f"| {_f(win['cpu_ms_per_frame'], '.0f')} | {_f(win['rss_mb'], '.0f')} |")
    return "\n".join(lines)


def note(section: dict[str, Any]) -> str:
    t, rate = section["text"], section["frames_per_text_token"]
    return (f"Long form: {section['seconds']:g} s of audio per configuration, one request of {t['tokens']} text "
            f"tokens ({t['language']}, the sentences of {t['from']} repeated), EOS held back, {rate:g} "
            f"frames per text token per segment; windows of {section['window_s']:g} s of audio (RTF = wall time "
            "spent producing the window's audio / its audio; the first window includes time to first audio). RSS = "
            "VmRSS just before the request, its highest sample after any chunk, after the last chunk.")
