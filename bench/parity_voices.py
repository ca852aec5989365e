"""Voice-encoder parity of a Base bundle: our torch-free path from a reference file to a voice against the
official one, clip by clip.

Ours: ``load_reference`` (soundfile + soxr HQ) → host log-mel → speaker encoder ONNX; codec encoder ONNX.
Official (fp32): ``librosa.load(sr=None, mono=True)`` + ``librosa.resample`` (what ``create_voice_clone_prompt``
does) → ``extract_speaker_embedding``; the speech tokenizer's ``encode``. Reported per clip: the 24 kHz wave's
max |diff|, x-vector cosine and max |diff|, code mismatches, and creation time per second of audio.
Without clips given, synthetic voiced clips at 16 / 22.05 / 44.1 / 48 kHz are used (pass real speech with
``--ref-audio`` for a stronger check).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.bundle import Bundle
from ..runtime.engine.assemble import load_stage
from ..runtime.voices.audio_in import load_reference

# (rate, seconds): lengths whose 24 kHz sample counts are not multiples of the 1920-sample frame.
SYNTHETIC = ((16000, 1.37), (22050, 4.21), (44100, 7.93), (48000, 12.05))


def synthetic_clips(folder: Path) -> list[Path]:
    """Harmonic 'voices' with a wobbling pitch and syllable-like envelope, written as WAV files."""
    import soundfile as sf

    paths = []
    for i, (rate, seconds) in enumerate(SYNTHETIC):
        t = np.arange(int(rate * seconds)) / rate
        f0 = 110 + 25 * i + 30 * np.sin(2 * np.pi * 1.1 * t)
        phase = 2 * np.pi * np.cumsum(f0) / rate
        envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.3 * t) ** 2
        y = 0.3 * envelope * sum(np.sin(k * phase) / k for k in range(1, 10))
        path = folder / f"synthetic-{rate}.wav"
        sf.write(path, y.astype(np.float32), rate)
        paths.append(path)
    return paths


def _official_wave(path: Path) -> np.ndarray:
    import librosa

    y, sr = librosa.load(path, sr=None, mono=True)
    return y if sr == 24000 else librosa.resample(y, orig_sr=sr, target_sr=24000)


def voice_parity(checkpoint: Path, bundle: Bundle, clips: list[Path] | None = None) -> dict[str, Any]:
    """Per-clip figures and their worst case; ``clips`` None uses the synthetic set."""
    import torch

    from ..export.codec_encoder_onnx import official_codes
    from ..export.decoder_onnx import load_official_tokenizer
    from ..export.torch_reference import load_official

    speaker = load_stage("speaker_encoder", bundle, "fp32")
    codec = load_stage("codec_encoder", bundle, "fp32") if bundle.manifest.find("codec_encoder") else None
    model, tokenizer = load_official(checkpoint), (load_official_tokenizer(checkpoint) if codec else None)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for path in clips or synthetic_clips(Path(tmp)):
            t0 = time.perf_counter()
            wave = load_reference(path)
            x_vector = speaker.embed(wave)
            t1 = time.perf_counter()
            codes = codec.encode(wave) if codec else None
            t2 = time.perf_counter()
            ref_wave = _official_wave(path)
            with torch.no_grad():
                ref_x = model.extract_speaker_embedding(ref_wave, 24000).float().numpy()
            seconds = len(wave) / 24000
            row = {"clip": Path(path).name, "seconds": round(seconds, 3),
                   "wave_max_abs": float(np.max(np.abs(wave - ref_wave))) if len(wave) == len(ref_wave) else None,
                   "x_vector_cos": float(x_vector @ ref_x / (np.linalg.norm(x_vector) * np.linalg.norm(ref_x))),
                   "x_vector_max_abs": float(np.max(np.abs(x_vector - ref_x))),
                   "speaker_ms_per_s": (t1 - t0) * 1e3 / seconds}
            if codec is not None:
                ref_codes = official_codes(tokenizer, ref_wave)
                row["frames"] = int(len(ref_codes))
                row["code_mismatches"] = (int((codes != ref_codes).sum()) if codes.shape == ref_codes.shape
                                          else int(ref_codes.size))
                row["codec_ms_per_s"] = (t2 - t1) * 1e3 / seconds
            rows.append(row)
    summary = {"x_vector_cos_min": min(r["x_vector_cos"] for r in rows),
               "x_vector_max_abs": max(r["x_vector_max_abs"] for r in rows),
               "enc_dim": int(speaker.enc_dim)}
    if codec is not None:
        summary["code_mismatches"] = sum(r["code_mismatches"] for r in rows)
        summary["frames"] = sum(r["frames"] for r in rows)
    return {"clips": rows, **summary}


def format_voice_parity(v: dict[str, Any]) -> list[str]:
    lines = [f"  voices    x-vector ({v['enc_dim']} wide) cos min {v['x_vector_cos_min']:.7f}, max |diff| "
             f"{v['x_vector_max_abs']:.1e}" + (f"; codec codes {v['code_mismatches']} mismatches over {v['frames']} "
                                             "frames" if "frames" in v else "")]
    for r in v["clips"]:
        codec = (f", codes {r['code_mismatches']}/{r['frames'] * 16} differ, codec {r['codec_ms_per_s']:.0f} ms/s"
                 if "frames" in r else "")
        lines.append(f"            {r['clip']:<28} {r['seconds']:6.2f} s  cos {r['x_vector_cos']:.7f}  speaker "
                     f"{r['speaker_ms_per_s']:.0f} ms/s{codec}")
    return lines
