"""Speaker encoder (Base models) → ONNX fp32: log-mel ``[1, T, 128]`` in, x-vector ``[1, enc_dim]`` out.

The official encoder is an ECAPA-TDNN without BatchNorm; its mel front end uses a complex STFT that does not
export, so the mel is computed on the host (``runtime/voices/mel.py``) with the 128 x 513 slaney filter
matrix computed here with librosa and shipped beside the graph. The graph stays fp32: peers report timbre
drift and NaNs from fp16/bf16 speaker encoders, and it is small (8.9 M parameters at 0.6B). Before the files
are returned the graph is run at frame counts other than the traced one and compared with the official
module on the same input (fidelity row in the manifest; a mismatch is an export bug and raises).
"""

from __future__ import annotations

import contextlib
import io
import json
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..quant import gates, metrics
from ..runtime.voices.mel import HOP, MIN_FRAMES, N_FFT, N_MELS
from .torch_reference import load_official_speaker_encoder

ONNX_FILE = "speaker_encoder.fp32.onnx"
MEL_FILE = "speaker_encoder.mel_filters.npy"
SAMPLE_RATE = 24000
FMAX = 12000
TRACE_FRAMES = 100
CHECK_FRAMES = (MIN_FRAMES, 37, 173, 700)  # none equal to the traced length, the shortest the encoder takes


def mel_filters() -> np.ndarray:
    """The official mel matrix: ``librosa.filters.mel(sr=24000, n_fft=1024, n_mels=128, fmin=0, fmax=12000)``."""
    import librosa

    return librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=N_MELS, fmin=0, fmax=FMAX).astype(np.float32)


def _check(path: Path, encoder: Any, seed: int = 0) -> dict[str, Any]:
    """ORT vs the official module on log-mel-like inputs at several lengths: worst cosine and max |Δ|."""
    import onnxruntime as ort
    import torch

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    cos, worst = [], 0.0
    for frames in CHECK_FRAMES:
        mel = (rng.standard_normal((1, frames, N_MELS)) * 2.0 - 6.0).astype(np.float32)  # log-mel range
        got = session.run(None, {"mel": mel})[0]
        with torch.no_grad():
            ref = encoder(torch.from_numpy(mel)).numpy()
        cos.append(metrics.cosine(ref, got))
        worst = max(worst, metrics.max_abs(ref, got))
    return {"cosine_min": float(min(cos)), "max_abs": float(worst), "frames": list(CHECK_FRAMES),
            "reference": "official speaker encoder (torch fp32) on the same log-mel input"}


def export_speaker_encoder(checkpoint_dir: Path, out_dir: Path, precisions: Sequence[str] = ("fp32",),
                           progress: Callable[[str], None] | None = None, *,
                           step: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Write the speaker encoder graph and its mel matrix into ``out_dir``; return their manifest entries."""
    import torch

    say = progress or (lambda _msg: None)
    if list(precisions) != ["fp32"]:
        raise ValueError(f"the speaker encoder ships in fp32 only (peers saw timbre drift at lower precision), "
                         f"got {list(precisions)}")
    cfg = json.loads((Path(checkpoint_dir) / "config.json").read_text(encoding="utf-8"))
    enc_dim = int(cfg["speaker_encoder_config"]["enc_dim"])
    t0 = time.perf_counter()
    say("speaker encoder: exporting the fp32 graph")
    encoder = load_official_speaker_encoder(checkpoint_dir)
    out_dir = Path(out_dir)
    path = out_dir / ONNX_FILE
    example = torch.zeros(1, TRACE_FRAMES, N_MELS)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        # The Res2Net chunking's strided slices are not constant-folded; harmless, and noise on the user's screen.
        warnings.filterwarnings("ignore", "Constant folding - Only steps=1", UserWarning)
        torch.onnx.export(encoder, (example,), str(path), dynamo=False, opset_version=18, input_names=["mel"],
                          output_names=["embedding"], dynamic_axes={"mel": {1: "frames"}})
    np.save(out_dir / MEL_FILE, mel_filters())
    fidelity = _check(path, encoder)
    failures = gates.gate("speaker_encoder", "fp32").failures(fidelity, speed=False)
    if failures:
        raise RuntimeError(f"speaker encoder ONNX does not match the official module: {'; '.join(failures)}")
    say(f"speaker encoder: fp32 ok, cosine {fidelity['cosine_min']:.7f}, max |Δ| {fidelity['max_abs']:.1e} "
        f"({time.perf_counter() - t0:.0f} s)")
    if step:
        step("speaker encoder fp32")
    meta = {"enc_dim": enc_dim, "input": "mel [1, T, 128] (host log-mel, T >= 5)", "output": "embedding [1, enc_dim]",
            "mel": {"file": MEL_FILE, "n_fft": N_FFT, "hop": HOP, "n_mels": N_MELS, "sample_rate": SAMPLE_RATE,
                    "fmax": FMAX}}
    return [{"role": "speaker_encoder", "file": ONNX_FILE, "format": "onnx", "precision": "fp32",
             "meta": meta, "fidelity": fidelity},
            {"role": "speaker_mel", "file": MEL_FILE, "format": "npy", "precision": "fp32",
             "meta": {"shape": [N_MELS, N_FFT // 2 + 1], "what": "librosa slaney mel matrix, sr 24000, fmax 12000"}}]
