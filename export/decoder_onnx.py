"""Qwen3-TTS-Tokenizer-12Hz decoder → stateful streaming ONNX (fp32 / fp16 / int8), validated and gated.

``decoder_stateful.StatefulDecoder`` (the official decoder with its streaming state threaded explicitly) is
exported once in fp32; ``decoder_quant`` derives the fp16 and int8 variants from that graph following
``quant.onnx_policy``. Every variant must decode a mixed-chunk stream equal to the offline decode (fp32) or pass
``quant.gates`` against the fp32 stream of the same codes (fp16/int8) before it ships.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..quant import gates
from ..quant import metrics as fidelity
from ..quant import onnx_policy as policies
from ..runtime.bundle import DECODER_METADATA_KEY
from ..runtime.engine.specs import precisions
from .decoder_quant import CALIBRATION_CHUNK, convert_fp16, open_runtime_decoder, quantize_int8
from .decoder_stateful import StatefulDecoder
from .official import qwen_tts

METADATA_KEY = DECODER_METADATA_KEY
FORMAT_VERSION = 1
OPSET = 18
CODES_INPUT = "codes"
PCM_OUTPUT = "pcm"
STATE_FILE = "decoder.state.npz"
CALIBRATION_FILE = "decoder.calibration.npz"
DEFAULT_PRECISIONS = precisions("decoder")
OFFLINE_REFERENCE = "official offline forward of the whole sequence (torch fp32)"
FP32_REFERENCE = "fp32 streaming ONNX decode of the same codes"


# --------------------------------------------------------------------------------------------------
# loading, codes, reference decode
# --------------------------------------------------------------------------------------------------

MIXED_SCHEDULE = (1, 2, 4, 7, 25)  # chunk sizes cycled through one validation stream
SPEED_CHUNKS = (4, 12)  # chunk sizes the int8 speed gate measures (4 = the 320 ms packet of the report)


def load_official_tokenizer(checkpoint_dir: Path) -> Any:
    """The official 12 Hz speech tokenizer (encoder + decoder, fp32, eval) from ``checkpoint_dir/speech_tokenizer``."""
    qwen_tts()
    from qwen_tts.core import Qwen3TTSTokenizerV2Model

    folder = Path(checkpoint_dir) / "speech_tokenizer"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}/config.json not found (expected the official checkpoint layout)")
    return Qwen3TTSTokenizerV2Model.from_pretrained(folder, dtype=torch.float32).eval()


def load_official_decoder(checkpoint_dir: Path) -> tuple[nn.Module, Any]:
    """The official decoder (fp32, eval) and tokenizer config from ``checkpoint_dir/speech_tokenizer``."""
    model = load_official_tokenizer(checkpoint_dir)
    return model.decoder.float().eval(), model.config


def random_codes(frames: int, seed: int, codebook_size: int = 2048, num_quantizers: int = 16,
                 stickiness: float = 0.0) -> np.ndarray:
    """Seeded codes [frames, Q]. With ``stickiness`` > 0 each code repeats its predecessor with that
    probability and values follow a skewed (Zipf-like) usage, closer to real codec streams than uniform."""
    rng = np.random.default_rng(seed)
    if stickiness <= 0:
        return rng.integers(0, codebook_size, (frames, num_quantizers), dtype=np.int64)
    ranks = np.arange(1, codebook_size + 1, dtype=np.float64)
    p = 1.0 / ranks
    p /= p.sum()
    perm = np.stack([rng.permutation(codebook_size) for _ in range(num_quantizers)], axis=1)
    draws = rng.choice(codebook_size, size=(frames, num_quantizers), p=p)
    codes = perm[draws, np.arange(num_quantizers)]
    keep = rng.random((frames, num_quantizers)) < stickiness
    for t in range(1, frames):
        codes[t] = np.where(keep[t], codes[t - 1], codes[t])
    return codes.astype(np.int64)


def calibration_set(seed: int, codebook_size: int, num_quantizers: int,
                    frames: int = 32, sequences: int = 4) -> dict[str, np.ndarray]:
    """Codes for int8 calibration: half uniform, half "sticky" skewed streams (shipped with the export)."""
    return {f"seq{i}": random_codes(frames, seed + i, codebook_size, num_quantizers, 0.7 * (i % 2))
            for i in range(sequences)}


@torch.no_grad()
def offline_decode(decoder: nn.Module, codes: np.ndarray) -> np.ndarray:
    """One official forward over the whole sequence (not ``chunked_decode``: approximate past 300 frames)."""
    wav = decoder(torch.from_numpy(np.ascontiguousarray(codes.T, dtype=np.int64))[None])
    return wav.reshape(-1).numpy().astype(np.float32)


def stream_decode(model_path: Path, codes: np.ndarray, schedule: Sequence[int] = MIXED_SCHEDULE,
                  threads: int | None = None, providers: Sequence[str] | None = None) -> np.ndarray:
    """Decode ``codes`` through the runtime class, cycling chunk sizes through ``schedule``."""
    return _stream(open_runtime_decoder(model_path, providers, threads), codes, schedule)


def _stream(dec: Any, codes: np.ndarray, schedule: Sequence[int]) -> np.ndarray:
    out, start, i = [], 0, 0
    while start < codes.shape[0]:
        n = schedule[i % len(schedule)]
        out.append(dec.decode(codes[start : start + n]))
        start, i = start + n, i + 1
    return np.concatenate(out)


def ms_per_frame(model_path: Path, chunk: int, threads: int = 1, frames: int = 24, repeats: int = 3,
                 clock: str = "cpu", seed: int = 7) -> float:
    """Milliseconds per frame on the CPU provider for calls of ``chunk`` frames.

    ``clock="cpu"`` (process CPU time, median of repeats, 1 thread) is the comparison metric: the build
    machines are shared and wall time there swings with neighbours while CPU time barely moves (bench/README).
    ``clock="wall"`` returns the best-of-repeats wall time, for reporting latency at ``threads``.
    """
    dec = open_runtime_decoder(model_path, threads=threads)
    codes = random_codes(max(frames, chunk), seed, dec.codebook_size, dec.num_quantizers)
    timer = time.process_time if clock == "cpu" else time.perf_counter
    dec.decode(codes[:chunk])  # warm-up: the first run allocates and plans
    samples = []
    for _ in range(repeats):
        dec.reset()
        n = 0
        t0 = timer()
        for start in range(0, codes.shape[0] - chunk + 1, chunk):
            dec.decode(codes[start : start + chunk])
            n += chunk
        samples.append((timer() - t0) / n * 1000.0)
    return float(np.median(samples)) if clock == "cpu" else min(samples)


def cpu_speedup(reference: Path, candidate: Path, chunks: Sequence[int] = SPEED_CHUNKS) -> dict[str, Any]:
    """CPU-cost speedup of ``candidate`` over ``reference`` (1 thread), the minimum over ``chunks``."""
    ref = {c: ms_per_frame(reference, c) for c in chunks}
    cand = {c: ms_per_frame(candidate, c) for c in chunks}
    return {
        "cpu_speedup": min(ref[c] / cand[c] for c in chunks),
        "cpu_ms_per_frame": {f"chunk{c}": round(cand[c], 2) for c in chunks},
        "fp32_cpu_ms_per_frame": {f"chunk{c}": round(ref[c], 2) for c in chunks},
        "speed_measure": "process CPU time per frame, 1 thread, CPU provider, median of 3",
    }


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def fidelity_metrics(test: np.ndarray, offline: np.ndarray, reference: np.ndarray, reference_name: str,
                     sample_rate: int) -> dict[str, Any]:
    """The parity record of one variant: exactness vs the offline decode, SNR/log-mel vs ``reference``."""
    return {
        "stream_vs_offline_max_abs": fidelity.max_abs(offline, test),
        "snr_db": _finite(fidelity.snr_db(reference, test)),
        "logmel_dist": fidelity.logmel_distance(reference, test, sample_rate),
        "cosine": fidelity.cosine(reference, test),
        "reference": reference_name,
    }


# --------------------------------------------------------------------------------------------------
# ONNX: export, metadata, variants, validation
# --------------------------------------------------------------------------------------------------


def _metadata(module: StatefulDecoder, config: Any, precision: str) -> dict[str, Any]:
    pol = policies.policy("decoder", precision)
    return {
        "format_version": FORMAT_VERSION,
        "precision": precision,
        "sample_rate": int(config.output_sample_rate),
        "samples_per_frame": module.samples_per_frame,
        "num_quantizers": module.num_quantizers,
        "codebook_size": module.codebook_size,
        "sliding_window": module.window,
        "codes_input": CODES_INPUT,
        "pcm_output": PCM_OUTPUT,
        "state": [dict(asdict(s), input=s.input, output=s.output) for s in module.specs],
        "initial_state": "zeros",
        "providers": list(pol.providers),
        "note": pol.note,
    }


def _set_metadata(path: Path, meta: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, sort_keys=True)
    model.doc_string = f"Qwen3-TTS 12 Hz codec decoder, stateful streaming, {meta['precision']}"
    onnx.save(model, str(path))


def export_fp32(module: StatefulDecoder, path: Path, example_frames: int = 3) -> None:
    """Export with the dynamo exporter (the TorchScript one fails on this model), frame axis dynamic."""
    codes = torch.zeros((example_frames, module.num_quantizers), dtype=torch.int64)
    state = module.initial_state()
    frames = torch.export.Dim("frames", min=1)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress
        program = torch.export.export(module, (codes, *state),
                                      dynamic_shapes=({0: frames}, tuple(None for _ in state)))
        onnx_program = torch.onnx.export(
            program, (codes, *state), dynamo=True, opset_version=OPSET, optimize=True, verify=False,
            input_names=[CODES_INPUT, *(s.input for s in module.specs)],
            output_names=[PCM_OUTPUT, *(s.output for s in module.specs)],
        )
    onnx_program.save(str(path))


def validate(path: Path, module_meta: dict[str, Any]) -> None:
    """ONNX checker plus an onnxruntime run of a 1- and a 3-frame chunk from the zero state."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    dec = open_runtime_decoder(path)
    codes = random_codes(4, 0, dec.codebook_size, dec.num_quantizers)
    pcm = np.concatenate([dec.decode(codes[:1]), dec.decode(codes[1:])])
    if pcm.shape != (4 * module_meta["samples_per_frame"],) or not np.all(np.isfinite(pcm)):
        raise RuntimeError(f"{path.name}: onnxruntime run produced {pcm.shape} / non-finite samples")
    if dec.frames_decoded != 4:
        raise RuntimeError(f"{path.name}: position counter {dec.frames_decoded} after 4 frames")


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


def export_decoder(
    checkpoint_dir: Path,
    out_dir: Path,
    precisions: Sequence[str] = DEFAULT_PRECISIONS,
    progress: Callable[[str], None] | None = None,
    *,
    validation_frames: int = 100,
    seed: int = 1234,
    calibration: dict[str, np.ndarray] | None = None,
    step: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Export the streaming decoder variants into ``out_dir``; return one manifest entry per shipped file.

    The fp32 graph is always exported and shipped first: it is the reference the other variants are
    gated against. Each variant is validated (checker + onnxruntime run) and gated (``quant.gates``); a
    failing fp16/int8 variant is deleted and the reason recorded in the fp32 entry's ``meta["rejected"]``.
    A failing fp32 graph raises: that is an export bug, not a precision trade-off. ``calibration``
    (name → codes [T, Q]) replaces the generated int8 calibration streams, e.g. with codes the
    checkpoint's own codec encoder produced from real speech.
    """
    say = progress or (lambda _msg: None)
    done = step or (lambda _label: None)  # one call per finished step, for the export progress bar
    unknown = [p for p in precisions if p not in DEFAULT_PRECISIONS]
    if unknown:
        raise ValueError(f"unsupported decoder precisions {unknown}; choose from {DEFAULT_PRECISIONS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    say("decoder: loading the official codec decoder")
    decoder, config = load_official_decoder(checkpoint_dir)
    module = StatefulDecoder(decoder).eval()
    if module.samples_per_frame != int(config.decode_upsample_rate):
        raise ValueError(f"decoder upsamples {module.samples_per_frame}x but config.json says "
                         f"{config.decode_upsample_rate}")
    sample_rate = int(config.output_sample_rate)
    codes = random_codes(validation_frames, seed, module.codebook_size, module.num_quantizers, stickiness=0.5)
    offline = offline_decode(decoder, codes)

    fp32_path = out_dir / "decoder.fp32.onnx"
    meta, fid, fp32_pcm = _export_reference(module, config, fp32_path, codes, offline, say)
    done("decoder fp32")
    rejected: dict[str, str] = {}
    fp32_entry = _entry("decoder", fp32_path.name, "onnx", "fp32", fid,
                        {**_entry_meta(meta, "fp32"), "rejected": rejected})
    initial = {s.name: t.numpy() for s, t in zip(module.specs, module.initial_state(), strict=True)}
    np.savez(out_dir / STATE_FILE, **initial)
    entries = [fp32_entry, _entry("decoder_state", STATE_FILE, "npz", "fp32", {}, {
        "kind": "initial_state", "state": meta["state"],
        "note": "all-zero state at position 0; one layout for every decoder precision"})]

    for precision in (p for p in DEFAULT_PRECISIONS[1:] if p in precisions):
        t0 = time.perf_counter()
        try:
            entry, vfid = _export_variant(precision, module, config, fp32_path, out_dir, say, seed,
                                          calibration)
            vfid.update(_variant_fidelity(precision, fp32_path, out_dir / entry["file"], codes, offline, fp32_pcm,
                                          sample_rate, say))
            failures = gates.gate("decoder", precision).failures(vfid)
        except Exception as exc:  # an optional variant that cannot be built is refused, not fatal
            vfid, failures = {}, [f"{precision} export failed: {type(exc).__name__}: {exc}"]
        measured = (f"snr {vfid['snr_db']:.1f} dB, log-mel {vfid['logmel_dist']:.3f} dB: "
                    if vfid.get("snr_db") is not None and "logmel_dist" in vfid else "")
        verdict = "REFUSED, " + "; ".join(failures) if failures else "passes its gate"
        say(f"decoder: {precision} {measured}{verdict} ({time.perf_counter() - t0:.0f} s)")
        done(f"decoder {precision}")
        if failures:
            rejected[precision] = "; ".join(failures)
            fp32_entry["meta"].setdefault("rejected_fidelity", {})[precision] = vfid
            for name in (f"decoder.{precision}.onnx", CALIBRATION_FILE if precision == "int8" else None):
                if name:
                    (out_dir / name).unlink(missing_ok=True)
            continue
        entries.append(entry)
        if precision == "int8":
            entries.append(_entry("calibration", CALIBRATION_FILE, "npz", "int8", {}, {
                "kind": "calibration_codes", "chunk": CALIBRATION_CHUNK,
                "note": "codes streamed through the fp32 graph (state carried) to calibrate int8"}))
    return entries


def _export_reference(module: StatefulDecoder, config: Any, fp32_path: Path, codes: np.ndarray,
                      offline: np.ndarray, say: Callable[[str], None]) -> tuple[dict[str, Any], dict[str, Any],
                                                                               np.ndarray]:
    """Export + validate the fp32 graph; its stream must equal the offline decode (else an export bug: raise)."""
    t0 = time.perf_counter()
    say("decoder: exporting the fp32 streaming graph (dynamo, opset 18)")
    meta = _metadata(module, config, "fp32")
    export_fp32(module, fp32_path)
    _set_metadata(fp32_path, meta)
    validate(fp32_path, meta)
    fp32_pcm = stream_decode(fp32_path, codes)
    fid = fidelity_metrics(fp32_pcm, offline, offline, OFFLINE_REFERENCE, int(config.output_sample_rate))
    fid.update(frames=len(codes), chunk_schedule=list(MIXED_SCHEDULE))
    failures = gates.gate("decoder", "fp32").failures(fid)
    if failures:
        raise RuntimeError(f"fp32 streaming decoder does not match the offline decode: {'; '.join(failures)}")
    say(f"decoder: fp32 ok, stream vs offline max |Δ| = {fid['stream_vs_offline_max_abs']:.2e} "
        f"({time.perf_counter() - t0:.0f} s)")
    return meta, fid, fp32_pcm


def _variant_fidelity(precision: str, fp32_path: Path, path: Path, codes: np.ndarray, offline: np.ndarray,
                      fp32_pcm: np.ndarray, sample_rate: int, say: Callable[[str], None]) -> dict[str, Any]:
    """A variant's stream against the fp32 stream of the same codes (+ its CPU cost for int8)."""
    pcm = stream_decode(path, codes)
    fid = fidelity_metrics(pcm, offline, fp32_pcm, FP32_REFERENCE, sample_rate)
    fid.update(frames=len(codes), chunk_schedule=list(MIXED_SCHEDULE))
    if precision == "int8":
        say("decoder: measuring int8 vs fp32 CPU cost")
        fid.update(cpu_speedup(fp32_path, path))
    return fid


def _entry(role: str, file: str, fmt: str, precision: str, fid: dict[str, Any],
           meta: dict[str, Any]) -> dict[str, Any]:
    return {"role": role, "file": file, "format": fmt, "precision": precision, "fidelity": fid, "meta": meta}


def _export_variant(precision: str, module: StatefulDecoder, config: Any, fp32_path: Path, out_dir: Path,
                    say: Callable[[str], None], seed: int,
                    calibration: dict[str, np.ndarray] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build, label and validate one derived variant; the caller measures and gates it."""
    path = out_dir / f"decoder.{precision}.onnx"
    meta = _metadata(module, config, precision)
    extra: dict[str, Any] = {}
    if precision == "fp16":
        say("decoder: converting to fp16 with the policy's fp32 islands")
        extra["node_precisions"] = convert_fp16(fp32_path, path)
    else:
        say("decoder: static int8 QDQ quantisation (calibrated on shipped codes)")
        calib = calibration or calibration_set(seed + 100, module.codebook_size, module.num_quantizers)
        np.savez(out_dir / CALIBRATION_FILE, **calib)
        extra["node_precisions"] = quantize_int8(fp32_path, path, calib, CALIBRATION_CHUNK)
        extra["calibration_file"] = CALIBRATION_FILE
    _set_metadata(path, meta)
    validate(path, meta)
    entry = _entry("decoder", path.name, "onnx", precision, {}, {**_entry_meta(meta, precision), **extra})
    return entry, entry["fidelity"]


def _entry_meta(meta: dict[str, Any], precision: str) -> dict[str, Any]:
    pol = policies.policy("decoder", precision)
    return {
        "sample_rate": meta["sample_rate"],
        "samples_per_frame": meta["samples_per_frame"],
        "num_quantizers": meta["num_quantizers"],
        "codebook_size": meta["codebook_size"],
        "sliding_window": meta["sliding_window"],
        "state_file": STATE_FILE,
        "intended_providers": list(pol.providers),
        "precision_note": pol.note,
        "precision_policy": pol.table(),
        "gate": gates.gate("decoder", precision).as_dict(),
        "opset": OPSET,
    }


def parity_report(checkpoint_dir: Path, export_dir: Path, frames: int = 100, seed: int = 4321,
                  schedule: Sequence[int] = MIXED_SCHEDULE) -> dict[str, Any]:
    """``{"decoder": {precision: {stream_vs_offline_max_abs, snr_db, logmel_dist, …}}}`` for every
    ``decoder.<precision>.onnx`` in ``export_dir``: the same metrics and references as the export gates."""
    decoder, config = load_official_decoder(checkpoint_dir)
    module = StatefulDecoder(decoder)
    codes = random_codes(frames, seed, module.codebook_size, module.num_quantizers, stickiness=0.5)
    offline = offline_decode(decoder, codes)
    sample_rate = int(config.output_sample_rate)
    report: dict[str, Any] = {}
    fp32_path = Path(export_dir) / "decoder.fp32.onnx"
    fp32_pcm = stream_decode(fp32_path, codes, schedule)
    report["fp32"] = fidelity_metrics(fp32_pcm, offline, offline, OFFLINE_REFERENCE, sample_rate)
    for precision in ("fp16", "int8"):
        path = Path(export_dir) / f"decoder.{precision}.onnx"
        if path.is_file():
            pcm = stream_decode(path, codes, schedule)
            report[precision] = fidelity_metrics(pcm, offline, fp32_pcm, FP32_REFERENCE, sample_rate)
    return {"decoder": report}
