"""``qwen3-tts-edge bench``: time to first audio, real-time factor, per-stage cost, memory and fidelity per precision.

Every configuration (talker precision x decoder precision x execution provider) runs the real runtime path —
``TTS.stream``, what ``speak`` uses — on a fixed set of texts with a fixed seed, each round in a fresh process
(``bench/timing.py``) so that its peak RSS is its own. Rounds are interleaved across configurations (round 1 of
every configuration, then round 2, ...), so slow drifts of the machine's background load hit all of them alike;
figures are medians over rounds x texts with their spread. ``--frames N`` forces exactly N frames per request
(equal work whatever the sampler does); ``--vs-reference MODEL`` adds the official PyTorch fp32 model through the
same loop as the baseline of every ratio and the fidelity section against it; ``--long-form SECONDS`` adds one
multi-minute request per configuration, timed window by window (``bench/long_form.py``). See bench/README.md for
the JSON schema.

Torch-free unless ``--vs-reference`` is given; matplotlib only with ``--plot``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.bundle import Bundle, BundleError, load_bundle
from ..runtime.cli import csv_list
from ..runtime.engine.config import DEFAULT_DECODER_THREADS, EngineConfig, add_engine_arguments
from ..runtime.engine.specs import precisions
from ..runtime.errors import Qwen3TTSEdgeError
from ..runtime.prompt import ModelIds
from ..runtime.segments import split_sentences
from ..runtime.text import TextTokenizer
from . import long_form, machine
from . import report as rep
from .requests import representative_request

PROG = "qwen3-tts-edge bench"
TALKER_ORDER = precisions("generation")
DECODER_ORDER = precisions("decoder")
# Engine settings the bench sweeps with its own flags (--talker, --decoder lists) instead of taking one value.
BENCH_SWEPT = ("backend", "talker_precision", "decoder_precision", "predictor_heads")
CPU = "CPUExecutionProvider"
WARMUP_FRAMES = 16  # enough for every chunk size of the default schedule (1+2+4+8) and to page the weights in


@dataclass(frozen=True)
class BenchText:
    id: str
    language: str
    text: str


TEXTS: tuple[BenchText, ...] = (
    BenchText("en-short", "english", "Hello! Thanks for calling, how can I help you today?"),
    BenchText("zh-medium", "chinese", "今天的天气非常好，我们一起去公园散步吧。路边的花都开了，空气里有淡淡的清香，"
                                      "孩子们在草地上放风筝。"),
    BenchText("de-long", "german", "Die Bahn nach Hamburg fährt heute mit etwa zwanzig Minuten Verspätung ab. Bitte "
                                   "achten Sie auf die Durchsagen am Bahnsteig, denn der Zug hält ausnahmsweise an "
                                   "Gleis sieben statt an Gleis drei. Reisende mit Anschlussverbindungen wenden sich "
                                   "bitte an das Servicepersonal im Zug. Wir bitten um Entschuldigung."),
)


class BenchError(Qwen3TTSEdgeError):
    """A bench request that cannot run as asked; the message says what to change."""

def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options (shared by ``qwen3-tts-edge bench`` and ``python -m ...bench.run``)."""
    p.add_argument("-b", "--bundle", required=True, type=Path)
    p.add_argument("--json", type=Path, metavar="FILE", help="write the report as JSON (schema: bench/README.md)")
    p.add_argument("--plot", type=Path, metavar="FILE", help="write the plots as one PNG (needs matplotlib)")
    p.add_argument("--markdown", type=Path, metavar="FILE", help="write the result tables as markdown")
    p.add_argument("--vs-reference", metavar="MODEL",
                   help="also time the official PyTorch fp32 model (the checkpoint the bundle came from) and measure "
                        "fidelity against it; needs the export extras")
    p.add_argument("--frames", type=int, help="force exactly N frames per request (equal work across configurations)")
    p.add_argument("--repeats", type=int, default=3,
                   help="rounds; each configuration runs once per round in a fresh process (default 3)")
    p.add_argument("--talker", type=csv_list, metavar="PRECISIONS", help="talker precisions to run (default: all)")
    p.add_argument("--decoder", type=csv_list, metavar="PRECISIONS", help="decoder precisions to run (default: all)")
    p.add_argument("--predictor-heads", type=csv_list, metavar="PRECISIONS",
                   help="the llama.cpp predictor's heads to run with each GGUF talker: f32 and/or the bundle's "
                        "quantised ones (int8); a row each (default: the runtime's choice for the bundle)")
    # The engine flags of speak/serve (EngineConfig); --talker/--decoder above sweep precisions instead, each
    # --provider is a configuration of its own, and the thread counts are pinned so runs compare.
    engine = p.add_argument_group(f"engine (as for speak; --provider: one run each, default {CPU})")
    add_engine_arguments(engine, skip=BENCH_SWEPT, defaults={"threads": 2, "decoder_threads": DEFAULT_DECODER_THREADS})
    p.add_argument("--texts", type=csv_list, metavar="IDS", help=f"bench texts to use (default all: "
                   f"{','.join(t.id for t in TEXTS)})")
    p.add_argument("--speaker", help="preset speaker (CustomVoice; default: the first in the bundle)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-frames", type=csv_list, default=["1", "2", "4", "8"], metavar="SCHEDULE",
                   help="decode schedule: frames per chunk, last repeats (default 1,2,4,8)")
    p.add_argument("--long-form", type=float, metavar="SECONDS",
                   help="also time one long request of SECONDS of audio per configuration (e.g. 180: several "
                        "segments), in a process of its own: RTF, stage ms per frame and RSS per window of the audio")
    p.add_argument("--long-form-window", type=float, default=long_form.DEFAULT_WINDOW_S, metavar="SECONDS",
                   help=f"audio window of the --long-form figures (default {long_form.DEFAULT_WINDOW_S:g})")


# ----------------------------------------------------------------------------------------------------------
# plan


def _ordered(have: Sequence[str], order: Sequence[str]) -> list[str]:
    return [p for p in order if p in have] + sorted(p for p in have if p not in order)


def _select(bundle: Bundle, role: str, wanted: list[str] | None, order: Sequence[str],
            refused: list[dict[str, str]]) -> tuple[list[str], list[str]]:
    have = _ordered({c.precision for c in bundle.manifest.find(role)}, order)
    if not wanted:
        return have, []
    why = {r["precision"]: r["reason"] for r in refused if r["role"] == role}
    missing = [p for p in wanted if p not in have]
    unknown = [p for p in missing if p not in why]
    if unknown:
        raise BenchError(f"bundle has no {role} in precision {', '.join(unknown)}; available: {', '.join(have)}")
    return [p for p in have if p in wanted], [f"{role} {p}: refused at export ({why[p]})" for p in missing]


def _reference_checkpoint(model: str, bundle: Bundle) -> Path:
    try:
        from ..export.official import qwen_tts
        from ..export.sources import ModelSourceError

        qwen_tts()
    except ImportError as exc:
        raise BenchError(f"--vs-reference needs the export extras (torch, qwen-tts): {exc}") from exc
    from .parity import source_checkpoint

    try:
        return source_checkpoint(model, bundle)
    except (ModelSourceError, BundleError) as exc:
        raise BenchError(str(exc)) from exc


# ----------------------------------------------------------------------------------------------------------
# workers


def _spawn(spec: dict[str, Any], workdir: Path, tag: str) -> dict[str, Any]:
    """Run one configuration in a fresh interpreter; its result record."""
    spec_path, out_path = workdir / f"{tag}.spec.json", workdir / f"{tag}.result.json"
    spec_path.write_text(json.dumps(spec), encoding="utf-8")
    out_path.unlink(missing_ok=True)
    proc = subprocess.run([sys.executable, "-m", "qwen3_tts_edge.bench.timing", str(spec_path), str(out_path)],
                          capture_output=True, text=True, errors="replace", check=False)
    if proc.returncode != 0 or not out_path.is_file():
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise BenchError(f"bench worker for {tag} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out_path.read_text(encoding="utf-8"))


def _say(progress, tag: str, res: dict[str, Any]) -> None:
    s = res["samples"]
    ttfa = np.median([x["ttfa_ms"] for x in s if x["ttfa_ms"] is not None]) if s else float("nan")
    rtf = np.median([x["rtf"] for x in s if x["rtf"] is not None]) if s else float("nan")
    progress(f"{tag}: load {res['load_s']:.1f} s, TTFA {ttfa:.0f} ms, RTF {rtf:.2f}, peak RSS "
             f"{res['peak_rss_mb']:.0f} MB")


# ----------------------------------------------------------------------------------------------------------
# the command


def _checked_settings(args: argparse.Namespace) -> tuple[list[int], list[BenchText]]:
    """The chunk schedule and bench texts, or a BenchError naming the bad option."""
    if args.frames is not None and args.frames < 1:
        raise BenchError("--frames must be at least 1")
    if args.repeats < 1:
        raise BenchError("--repeats must be at least 1")
    if args.long_form is not None and not args.long_form > 0:
        raise BenchError("--long-form must be a positive number of seconds")
    if not args.long_form_window > 0:
        raise BenchError("--long-form-window must be a positive number of seconds")
    try:
        schedule = [int(v) for v in args.chunk_frames]
    except ValueError as exc:
        raise BenchError(f"--chunk-frames must be positive integers: {exc}") from exc
    if not schedule or min(schedule) < 1:
        raise BenchError("--chunk-frames must be positive integers")
    by_id = {t.id: t for t in TEXTS}
    unknown = [t for t in args.texts or [] if t not in by_id]
    if unknown:
        raise BenchError(f"unknown bench texts {', '.join(unknown)}; choose from {', '.join(by_id)}")
    if args.plot is not None:
        from .plots import require_matplotlib

        require_matplotlib()
    return schedule, [by_id[t] for t in args.texts] if args.texts else list(TEXTS)


def _providers(wanted: Sequence[str] | None, skipped: list[str]) -> list[str]:
    """The requested onnxruntime providers this build has (the others are noted in ``skipped``)."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    providers = []
    for p in wanted or [CPU]:
        if p in available:
            providers.append(p)
        else:
            skipped.append(f"provider {p}: not available in this onnxruntime build ({', '.join(available)})")
    if not providers:
        raise BenchError(f"none of the requested providers is available (this onnxruntime has {', '.join(available)})")
    return providers


def _spec(base: dict[str, Any], variant: str, decoder: str, provider: str) -> dict[str, Any]:
    """A worker's spec for one configuration: the variant's talker precision and predictor heads."""
    talker, heads = rep.split_variant(variant)
    return {**base, "talker": talker, "decoder": decoder, "provider": provider,
            "engine": {**base["engine"], "predictor_heads": heads or "f32"}}


def _heads_variants(bundle: Bundle, talkers: list[str], wanted: list[str] | None) -> list[str]:
    """Talker precisions as variants: GGUF ones once per predictor-heads precision asked for (``P``: float32
    heads, ``P+int8``: the quantised ones); default: what the runtime would load."""
    have = sorted({c.precision for c in bundle.manifest.find("predictor_heads")})
    asked = sorted({c.precision for c in bundle.manifest.find("predictor_heads")
                    if (c.meta or {}).get("requested", True)})
    heads = wanted or (asked[:1] or ["f32"])
    bad = [h for h in heads if h != "f32" and h not in have]
    if bad:
        raise BenchError(f"this bundle has no {', '.join(bad)} predictor heads (it has: {', '.join(['f32'] + have)}); "
                         "export them with `qwen3-tts-edge export MODEL -o BUNDLE --predictor-heads int8`")
    out = []
    for t in talkers:
        if bundle.manifest.component("talker", t).format != "gguf":
            out.append(t)
            continue
        out += [t if h == "f32" else f"{t}+{h}" for h in heads]
    return out


def _run_rounds(args: argparse.Namespace, base: dict[str, Any], configs: list[tuple[str, str, str]],
                checkpoint: Path | None, progress) -> tuple[dict[tuple[str, str, str], list[dict[str, Any]]],
                                                           list[dict[str, Any]]]:
    """Every configuration x round in a fresh worker process, rounds interleaved across configurations."""
    results: dict[tuple[str, str, str], list[dict[str, Any]]] = {c: [] for c in configs}
    ref_results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="qwen3-tts-edge-bench-") as tmp:
        work = Path(tmp)
        for r in range(args.repeats):
            if checkpoint is not None:
                spec = {**base, "reference": str(checkpoint), "return_codes": r == 0}
                ref_results.append(_spawn(spec, work, f"ref{r}"))
                _say(progress, f"round {r + 1}/{args.repeats} reference torch-fp32", ref_results[-1])
            for t, d, p in configs:
                res = _spawn(_spec(base, t, d, p), work, f"{t}.{d}.{len(results)}.{r}")
                results[(t, d, p)].append(res)
                _say(progress, f"round {r + 1}/{args.repeats} talker {t} x decoder {d} ({p})", res)
    return results, ref_results


def _long_form_section(args: argparse.Namespace, bundle: Bundle, base: dict[str, Any],
                       configs: list[tuple[str, str, str]], progress) -> dict[str, Any] | None:
    """``--long-form``: one long request per configuration, each in a fresh worker (``bench/long_form.py``)."""
    if args.long_form is None:
        return None
    source = next(t for t in TEXTS if t.id == long_form.SOURCE_TEXT)
    tokenizer = TextTokenizer.from_folder(bundle.root / "tokenizer")
    audio = bundle.manifest.audio
    frame_s = int(audio["samples_per_frame"]) / int(audio["sample_rate"])
    needed = long_form.text_tokens_needed(args.long_form, frame_s)
    text = long_form.long_text(split_sentences(source.text), lambda s: len(tokenizer.encode(s)), needed)
    request = {"seconds": args.long_form, "window_s": args.long_form_window, "text": text,
               "language": source.language}
    runs = []
    with tempfile.TemporaryDirectory(prefix="qwen3-tts-edge-bench-long-") as tmp:
        for i, (t, d, p) in enumerate(configs):
            res = _spawn({**_spec(base, t, d, p), "long_form": request}, Path(tmp), f"long.{t}.{d}.{i}")
            runs.append({**_run_names(t), "decoder": d, "provider": p, **res})
            progress(f"long form talker {t} x decoder {d} ({p}): {res['audio_s']:.0f} s of audio in "
                     f"{res['wall_s']:.0f} s, RTF {rep._f(res['rtf'], '.2f')} (first window "
                     f"{rep._f(res['rtf_first_window'], '.2f')}, last {rep._f(res['rtf_last_window'], '.2f')}), "
                     f"{res['segments']} segments, RSS {rep._f(res['rss_mb']['start'], '.0f')} -> "
                     f"{rep._f(res['rss_mb']['end'], '.0f')} MB")
    return {"seconds": args.long_form, "window_s": args.long_form_window,
            "frames_per_text_token": long_form.FRAMES_PER_TEXT_TOKEN,
            "text": {"from": source.id, "language": source.language, "tokens": len(tokenizer.encode(text)),
                     "chars": len(text), "text": text},
            "how": long_form.HOW.format(source=source.id, rate=long_form.FRAMES_PER_TEXT_TOKEN), "runs": runs}


def _reference_section(ref_results: list[dict[str, Any]], model: str) -> dict[str, Any] | None:
    if not ref_results:
        return None
    return {"talker": "torch-fp32", "predictor": "torch-fp32", "decoder": "torch-fp32", "model": model,
            "how": _reference_how(),
            "offline_decode_ms_per_frame": rep.stat(x.get("offline_decode_ms_per_frame")
                                                    for x in ref_results)["median"],
            **rep.aggregate(ref_results), "bundle_mb": None}


def _run_names(variant: str) -> dict[str, str]:
    """A run's talker, predictor and predictor-heads precisions, and its variant (the key of the per-variant
    sections: floor, fidelity, measured ms)."""
    talker, heads = rep.split_variant(variant)
    return {"talker": talker, "predictor": talker, "predictor_heads": heads or "f32", "variant": variant}


def _runs(bundle: Bundle, aggs: dict[tuple[str, str, str], dict[str, Any]], floor: dict[str, Any],
          reference: dict[str, Any] | None, fid: dict[str, Any] | None) -> list[dict[str, Any]]:
    """One row per configuration: its aggregate, bundle size, bandwidth-floor ratio, ratios and fidelity."""
    runs = []
    for (t, d, p), agg in aggs.items():
        fl = floor["talker"][t]["floor_ms_per_frame"]
        runs.append({**_run_names(t), "decoder": d, "provider": p, **agg,
                     "bundle_mb": rep.bundle_bytes(bundle, t, d) / 1e6,
                     "floor_ms_per_frame": fl, "floor_ratio": _tp(agg) / fl if fl else None,
                     "vs_reference": rep.vs_reference(agg, reference) if reference else None,
                     "fidelity": rep.run_fidelity(fid, t, d) if fid else rep.manifest_fidelity(bundle, t, d)})
    return runs


def run_bench(args: argparse.Namespace, progress=lambda msg: None) -> dict[str, Any]:
    """Run the benchmark described by parsed ``args``; the report (schema in bench/README.md)."""
    schedule, texts = _checked_settings(args)
    try:
        bundle = load_bundle(args.bundle)
    except BundleError as exc:
        raise BenchError(str(exc)) from exc
    m = bundle.manifest
    request = representative_request(ModelIds.from_manifest(m), args.speaker)
    refused = rep.refused(bundle)
    talkers, skipped = _select(bundle, "talker", args.talker, TALKER_ORDER, refused)
    decoders, skipped_dec = _select(bundle, "decoder", args.decoder, DECODER_ORDER, refused)
    skipped += skipped_dec
    if not talkers or not decoders:
        raise BenchError(f"bundle {bundle.root} needs a talker and a decoder to bench; export it with "
                         f"`qwen3-tts-edge export MODEL -o {bundle.root} --force --talker q8_0 --decoder fp32`")
    providers = _providers(args.providers, skipped)
    checkpoint = _reference_checkpoint(args.vs_reference, bundle) if args.vs_reference else None

    start_load = os.getloadavg()
    progress("measuring memory bandwidth")
    bw = [machine.memory_bandwidth_gbs()]
    frames = args.frames
    warm = min(frames, WARMUP_FRAMES) if frames else WARMUP_FRAMES
    engine = asdict(EngineConfig.from_args(args, providers=None, verify=False))
    base = {"bundle": str(bundle.root), "threads": args.threads, "decoder_threads": args.decoder_threads,
            "n_gpu_layers": args.n_gpu_layers, "engine": engine,
            "frames": frames, "texts": [asdict(t) for t in texts], "seed": args.seed, "chunk_frames": schedule,
            "warmup_frames": warm, **request}
    talkers = _heads_variants(bundle, talkers, args.predictor_heads)
    configs = [(t, d, p) for p in providers for t in talkers for d in decoders]
    results, ref_results = _run_rounds(args, base, configs, checkpoint, progress)
    long = _long_form_section(args, bundle, base, configs, progress)
    bw.append(machine.memory_bandwidth_gbs())
    end_load = os.getloadavg()

    reference = _reference_section(ref_results, args.vs_reference)
    fid = None
    if checkpoint is not None:
        codes = ref_results[0].get("codes") if ref_results else None
        fid = rep.fidelity_section(checkpoint, bundle, talkers, decoders, None if codes is None else np.asarray(codes),
                                   schedule, args.threads, args.seed, progress)
    aggs = {c: rep.aggregate(res) for c, res in results.items()}
    n_frames = frames or max(1, int(np.median([a["frames"] for a in aggs.values()])))
    floor = rep.floor_section(bundle, talkers, decoders, max(bw), n_frames, schedule)
    runs = _runs(bundle, aggs, floor, reference, fid)
    return {
        "schema": rep.SCHEMA,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {**machine.describe(args.threads, args.decoder_threads), "bandwidth_gbs": max(bw),
                    "bandwidth_samples_gbs": bw,
                    "bandwidth_how": "bench/machine.memory_bandwidth_gbs: best of 5 single-stream numpy reductions "
                                     "over 512 MiB, measured before and after the timed runs",
                    "load_average": {"start": list(start_load), "end": list(end_load)}},
        "bundle": {"path": str(bundle.root), "model": m.source.get("model"),
                   "model_type": m.model.get("tts_model_type"), "model_size": m.model.get("tts_model_size"),
                   "total_mb": sum(c.size for c in m.components) / 1e6},
        "settings": {"frames": frames, "repeats": args.repeats, "threads": args.threads,
                     "decoder_threads": args.decoder_threads, "seed": args.seed,
                     "chunk_frames": schedule, "providers": providers, "n_gpu_layers": args.n_gpu_layers,
                     "texts": [asdict(t) for t in texts], "request": request,
                     "warmup": f"one {warm}-frame request of {texts[0].id} per process, not timed",
                     "process": "every configuration x round in a fresh interpreter (bench/timing.py); rounds "
                                "interleaved across configurations"},
        "reference": reference,
        "floor_ms_per_frame": {t: f["floor_ms_per_frame"] for t, f in floor["talker"].items()},
        "floor": floor,
        "measured_talker_predictor_ms": {t: float(np.median([_tp(r) for r in runs if r["variant"] == t]))
                                         for t in talkers},
        "measured_decoder_ms": {d: float(np.median([r["ms_per_frame"]["decoder"] for r in runs if r["decoder"] == d]))
                                for d in decoders},
        "runs": runs,
        "refused": refused,
        "skipped": skipped,
        "fidelity": fid,
        "long_form": long,
    }


def _tp(run: dict[str, Any]) -> float:
    """Talker + code predictor ms per frame: the part the bandwidth floor bounds."""
    return run["ms_per_frame"]["talker"] + run["ms_per_frame"]["predictor"]


def _reference_how() -> str:
    from .timing import REFERENCE_HOW

    return REFERENCE_HOW


def write_outputs(report: dict[str, Any], args: argparse.Namespace) -> None:
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1, allow_nan=False) + "\n",
                                   encoding="utf-8")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        parts = [rep.markdown_table(report), rep.TABLE_NOTE, rep.floor_table(report)]
        if report.get("long_form"):
            lf = report["long_form"]
            parts += [long_form.markdown_table(lf), long_form.note(lf), long_form.windows_table(lf)]
        text = "\n\n".join(parts)
        Path(args.markdown).write_text(text + "\n", encoding="utf-8")
    if args.plot:
        from .plots import plot_report

        plot_report(report, args.plot)


def _plain(o: Any) -> Any:
    """JSON-ready copy: numpy scalars as Python numbers, non-finite floats (e.g. an identical signal's SNR) as None."""
    if isinstance(o, dict):
        return {str(k): _plain(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_plain(v) for v in o]
    if isinstance(o, np.generic):
        o = o.item()
    if isinstance(o, float) and not np.isfinite(o):
        return None
    return o


def cmd_bench(args: argparse.Namespace) -> int:
    """Entry point of ``qwen3-tts-edge bench``."""
    report = run_bench(args, progress=lambda msg: print(f"qwen3-tts-edge: bench: {msg}", file=sys.stderr, flush=True))
    report = _plain(report)
    print(rep.format_summary(report))
    write_outputs(report, args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m qwen3_tts_edge.bench.run ...``: the same command outside the main CLI."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    add_bench_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return cmd_bench(args)
    except Qwen3TTSEdgeError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
