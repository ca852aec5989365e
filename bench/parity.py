"""``qwen3-tts-edge parity``: every exported stage of a bundle against the official PyTorch model.

One report, built from the same functions the tests use: talker and code-predictor logits along a
teacher-forced trajectory (cosine, KL, top-1) per generation precision (GGUF or ONNX), greedy free-running frames
identical to the official ``generate``, prompt vectors against the official ``inputs_embeds``, and the decoder section
(streaming vs offline, SNR, log-mel) per ONNX precision. Export side (needs torch + qwen-tts).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.bundle import Bundle, BundleError, load_bundle
from ..runtime.cli import csv_list
from ..runtime.errors import Qwen3TTSEdgeError
from ..runtime.prompt import ModelIds, build_prompt
from ..runtime.sampler import CodeSampler, ResidualSampling, SamplingParams
from ..runtime.text import TextTokenizer, assistant_text, instruct_text, ref_text_template
from .report import onnx_generation_fidelity
from .requests import representative_request

PARITY_TEXT = "The quick brown fox jumps over the lazy dog, again and again, until the sun goes down."


class _Captured(Exception):
    def __init__(self, kwargs: dict[str, Any]):
        super().__init__("captured")
        self.kwargs = kwargs


def official_prompt(model: Any, tok: TextTokenizer, text: str, *, language: str, speaker: str | None = None,
                    instruct: str | None = None, voice: Any = None, streaming: bool = True
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The official ``generate``'s (inputs_embeds, trailing_text_hidden, tts_pad) for one request.

    Token ids come from our tokenizer so that only the prompt layout is compared (the official wrapper's
    transformers 4.57.3 loader applies a Mistral regex "fix" to Qwen2 tokenizers; see README, Limits).
    """
    import torch

    def capture(**kwargs: Any) -> None:
        raise _Captured(kwargs)

    original = model.talker.generate
    model.talker.generate = capture
    try:
        ids = torch.tensor([tok.encode(assistant_text(text))])
        kwargs: dict[str, Any] = dict(input_ids=[ids], languages=[language], non_streaming_mode=not streaming)
        if instruct:
            kwargs["instruct_ids"] = [torch.tensor([tok.encode(instruct_text(instruct))])]
        if speaker:
            kwargs["speakers"] = [speaker]
        if voice is not None:
            icl = voice.ref_codes is not None
            kwargs["voice_clone_prompt"] = {
                "ref_code": [torch.from_numpy(np.asarray(voice.ref_codes))] if icl else None,
                "ref_spk_embedding": [torch.from_numpy(np.asarray(voice.speaker_embedding))],
                "x_vector_only_mode": [not icl], "icl_mode": [icl],
            }
            if icl:
                kwargs["ref_ids"] = [torch.tensor([tok.encode(ref_text_template(voice.ref_text))])]
        try:
            model.generate(**kwargs)
        except _Captured as cap:
            k = cap.kwargs
            return (k["inputs_embeds"][0].float().numpy(), k["trailing_text_hidden"][0].float().numpy(),
                    k["tts_pad_embed"].reshape(-1).float().numpy())
        raise RuntimeError("official generate did not reach talker.generate")
    finally:
        model.talker.generate = original


def _engines(bundle: Bundle, precision: str, strict: bool):
    """The bundle's engines for ``precision`` (llama.cpp GGUF or ONNX Runtime graphs, by component format)."""
    from ..runtime.engine.assemble import load_stage as load

    gguf = bundle.manifest.component("talker", precision).format == "gguf"
    kw: dict[str, Any] = {"kv_type": "f32", "flash_attn": False} if strict and gguf else {}
    engines = load("generation", bundle, precision, n_ctx=8192, **kw)
    return engines.talker, engines.predictor, engines.tables


def _logits_of(predictor: Any, hidden: np.ndarray, c0: int, forced: np.ndarray | None = None) -> list[np.ndarray]:
    """Each step's logits of one predictor frame, choosing ``forced`` codes (greedy when None)."""
    seen: list[np.ndarray] = []

    def choose(step: int, logits: np.ndarray) -> int:
        seen.append(np.array(logits, copy=True))
        return int(np.argmax(logits)) if forced is None else int(forced[step])

    predictor.predict(hidden, c0, ResidualSampling.host(choose))
    return seen


TIE_GAP = 1e-3  # a flip where the reference's top-2 logits are closer than this is a numerical tie


def greedy_agreement(model: Any, bundle: Bundle, precision: str, frames: int, text: str = PARITY_TEXT
                     ) -> dict[str, Any]:
    """Greedy decisions of the bundle's engines against the official modules, along the official trajectory.

    Both run in lockstep on the same inputs; the official modules choose (so this is their greedy ``generate``
    trajectory: tests/test_frame_loop.py proves the reference backends reproduce it code for code). Every decision
    where our argmax differs is recorded with the reference's logit gap between its choice and ours, so a
    flip can be told apart as a near-tie rather than a bug. ``identical_frames`` is where free-running greedy
    generation would first diverge.
    """
    from ..export.torch_reference import TorchPredictor, TorchTables, TorchTalker

    ids = ModelIds.from_manifest(bundle.manifest)
    tok = TextTokenizer.from_folder(bundle.root / "tokenizer")
    m = bundle.manifest
    talker, predictor, tables = _engines(bundle, precision, strict=precision == "f32")
    ref_talker, ref_pred, ref_tables = TorchTalker(model), TorchPredictor(model), TorchTables(model)
    prompt = build_prompt(ids, tok, ref_tables, text, language="english", **representative_request(ids))
    sampler = CodeSampler(SamplingParams().greedy(), vocab_size=int(m.model["talker"]["vocab_size"]),
                          eos_id=int(m.codec_ids["codec_eos_token_id"]))
    flips: list[dict[str, Any]] = []

    def note(frame: int, book: int, ref_scores: np.ndarray, our_scores: np.ndarray) -> int:
        choice, ours = int(np.argmax(ref_scores)), int(np.argmax(our_scores))
        if ours != choice:
            flips.append({"frame": frame, "codebook": book, "ref_gap": float(ref_scores[choice] - ref_scores[ours])})
        return choice

    ours_out, ref_out = talker.prefill(prompt.embeds), ref_talker.prefill(prompt.embeds)
    done = 0
    for k in range(frames):
        ref_scores = sampler.process_c0(ref_out.logits, k)
        c0 = note(k, 0, ref_scores, sampler.process_c0(ours_out.logits, k))
        sampler.generated.append(c0)
        if c0 == sampler.eos_id:
            break
        ref_logits = _logits_of(ref_pred, ref_out.hidden, c0)  # greedy: the reference's own choices
        residual = np.array([int(np.argmax(lg)) for lg in ref_logits], dtype=np.int64)
        our_logits = _logits_of(predictor, ours_out.hidden, c0, forced=residual)
        for j in range(len(residual)):
            note(k, j + 1, ref_logits[j], our_logits[j])
        embed = (ref_tables.frame_embeds(np.concatenate([[c0], residual])[None])[0] + prompt.text_track(k))
        ours_out, ref_out = talker.step(embed.astype(np.float32)), ref_talker.step(embed.astype(np.float32))
        done = k + 1
    first = flips[0]["frame"] if flips else done
    return {"frames": done, "identical_frames": first, "flips": flips,
            "max_flip_gap": max((f["ref_gap"] for f in flips), default=0.0), "tie_gap": TIE_GAP,
            "all_flips_are_ties": all(f["ref_gap"] < TIE_GAP for f in flips)}


def prompt_max_abs(model: Any, bundle: Bundle, precision: str) -> float:
    """Largest difference between our prompt vectors (from the bundle's tables) and the official ones."""
    ids = ModelIds.from_manifest(bundle.manifest)
    tok = TextTokenizer.from_folder(bundle.root / "tokenizer")
    req = {"language": "english", **representative_request(ids)}
    talker, predictor, tables = _engines(bundle, precision, strict=True)
    worst = 0.0
    for streaming in (True, False):
        ours = build_prompt(ids, tok, tables, PARITY_TEXT, streaming_text=streaming, **req)
        embeds, trailing, _ = official_prompt(model, tok, PARITY_TEXT, streaming=streaming, **req)
        worst = max(worst, float(np.max(np.abs(ours.embeds - embeds))), float(np.max(np.abs(ours.trailing - trailing))))
    return worst


def source_checkpoint(model: str, bundle: Bundle) -> Path:
    """MODEL's checkpoint folder, refusing one the bundle was not exported from (a reference must be the same)."""
    from ..export.sources import resolve_model, source_file_hashes

    source = resolve_model(model)
    hashes = source_file_hashes(source.path)
    exported_from = bundle.manifest.source.get("files", {})
    for name in ("config.json", "model.safetensors"):
        if name in exported_from and hashes.get(name) != exported_from[name]:
            raise BundleError(f"{model} is not the checkpoint this bundle was exported from ({name} differs); "
                              f"the bundle came from {bundle.manifest.source.get('model')}")
    return Path(source.path)


STAGES = ("talker", "decoder", "voices")


def parity_report(bundle_dir: Path, model: str, *, frames: int = 200, stages: Sequence[str] = STAGES,
                  ref_audio: Sequence[Path] | None = None, progress=lambda msg: None) -> dict[str, Any]:
    """The parity report of a bundle against MODEL (which must be the checkpoint it was exported from).

    ``stages``: talker (talker + predictor), decoder, voices (speaker and codec encoders, Base bundles).
    """
    from ..export.decoder_onnx import parity_report as decoder_parity
    from ..export.torch_reference import load_official
    from .parity_llama import parity as llama_parity
    from .parity_voices import voice_parity

    bundle = load_bundle(bundle_dir)
    checkpoint = source_checkpoint(model, bundle)
    precisions = sorted(c.precision for c in bundle.manifest.find("talker")) if "talker" in stages else []
    report: dict[str, Any] = {"bundle": str(bundle_dir), "model": model, "frames": frames}
    if "voices" in stages and bundle.manifest.find("speaker_encoder"):
        progress(f"voice encoders vs the official clone path ({len(ref_audio) if ref_audio else 'synthetic'} clips)")
        report["voices"] = voice_parity(checkpoint, bundle, list(ref_audio) if ref_audio else None)
    if precisions:
        gguf = [p for p in precisions if bundle.manifest.component("talker", p).format == "gguf"]
        report["talker"], report["predictor"] = {}, {}
        if gguf:
            progress(f"talker/predictor logits along a teacher-forced trajectory: {', '.join(gguf)}")
            llama = llama_parity(checkpoint, bundle.root, gguf)
            report["talker"] = {p: llama[p]["talker"] for p in gguf}
            report["predictor"] = {p: llama[p]["predictor"] for p in gguf}
        for p in precisions:
            if p not in gguf:  # ONNX graphs: their export check against the official modules
                report["talker"][p], report["predictor"][p] = onnx_generation_fidelity(bundle, p)
        official = load_official(checkpoint)
        report["greedy_identical_frames"], report["greedy"] = {}, {}
        for p in precisions:
            progress(f"greedy decisions vs the official modules ({p}, {frames} frames)")
            agreement = greedy_agreement(official, bundle, p, frames)
            report["greedy_identical_frames"][p] = agreement["identical_frames"]
            report["greedy"][p] = agreement
        best = "f32" if "f32" in precisions else precisions[0]
        report["prompt_max_abs"] = prompt_max_abs(official, bundle, best)
        report["prompt_precision"] = best
    if "decoder" in stages and bundle.manifest.find("decoder"):
        progress("decoder: streaming vs offline, SNR, log-mel")
        report.update(decoder_parity(checkpoint, bundle.root))
    return report


def format_report(report: dict[str, Any]) -> str:
    """Readable parity summary."""
    lines = [f"parity of {report['bundle']} against {report['model']}"]
    for stage in ("talker", "predictor"):
        for p, r in report.get(stage, {}).items():
            if "logit_cos" not in r:  # ONNX graphs: minimum cosine of their export check
                top1 = f"  greedy codes {r['top1']:.3f}" if r.get("top1") is not None else ""
                lines.append(f"  {stage:<9} {p:<7} logit cos min {r['logit_cos_min']:.6f} ({r['vs']}){top1}")
                continue
            lines.append(f"  {stage:<9} {p:<7} logit cos {r['logit_cos']:.6f}  KL {r['kl']:.2e}  top-1 {r['top1']:.3f}")
    for p, g in report.get("greedy", {}).items():
        flips = g["flips"]
        ties = "all near-ties" if g["all_flips_are_ties"] else "NOT all near-ties"
        detail = (f"; {len(flips)} flipped decisions along the official trajectory ({ties}, largest reference "
                  f"gap {g['max_flip_gap']:.1e})") if flips else ""
        lines.append(f"  greedy    {p:<7} {g['identical_frames']}/{g['frames']} frames identical to the official "
                     f"greedy generate{detail}")
    if "prompt_max_abs" in report:
        lines.append(f"  prompt    {report['prompt_precision']:<7} max |diff| {report['prompt_max_abs']:.2e}")
    for p, r in report.get("decoder", {}).items():
        lines.append(f"  decoder   {p:<7} stream vs offline {r['stream_vs_offline_max_abs']:.2e}  "
                     f"SNR {r['snr_db']:.1f} dB  log-mel {r['logmel_dist']:.4f} dB")
    if "voices" in report:
        from .parity_voices import format_voice_parity

        lines.extend(format_voice_parity(report["voices"]))
    return "\n".join(lines)


def write_report(report: dict[str, Any], path: Path) -> None:
    Path(path).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")


class ParityError(Qwen3TTSEdgeError):
    """A parity request that cannot run as asked."""


def add_parity_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-b", "--bundle", required=True, type=Path)
    p.add_argument("--model", required=True, metavar="MODEL")
    p.add_argument("--json", type=Path, metavar="FILE", help="also write the report as JSON")
    p.add_argument("--frames", type=int, default=200, help="greedy free-running frames to compare (default 200)")
    p.add_argument("--stages", type=csv_list, default=list(STAGES), metavar="LIST",
                   help=f"which stages to compare (default all: {','.join(STAGES)})")
    p.add_argument("--ref-audio", type=Path, action="append", metavar="FILE",
                   help="reference clip for the voice encoders (repeatable; default: synthetic voiced clips)")


def cmd_parity(args: argparse.Namespace) -> int:
    """``qwen3-tts-edge parity``: needs the export side (the official PyTorch model)."""
    from ..export.build import missing_export_modules

    missing = missing_export_modules()
    if missing:
        raise ParityError(f"parity needs the [export] extra (missing: {', '.join(missing)}); see the README's setup")
    if args.frames < 1:
        raise ParityError("--frames must be at least 1")
    unknown = sorted(set(args.stages) - set(STAGES))
    if unknown:
        raise ParityError(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    report = parity_report(args.bundle, args.model, frames=args.frames, stages=args.stages, ref_audio=args.ref_audio,
                           progress=lambda msg: print(f"qwen3-tts-edge: {msg}", file=sys.stderr, flush=True))
    print(format_report(report))
    if args.json:
        write_report(report, args.json)
    return 0
