"""Reference audio as the official clone path reads it: any file or array, mono by channel mean, 24 kHz.

The official ``create_voice_clone_prompt`` resamples with ``librosa.resample`` (default ``soxr_hq``, length
``ceil(n * 24000 / sr)``); the same soxr quality here gives the same samples without librosa. Nothing else is
done to the clip (no normalisation, trimming or VAD), as upstream.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from ..errors import Qwen3TTSEdgeError

ENCODER_SAMPLE_RATE = 24000


class AudioInputError(Qwen3TTSEdgeError):
    """Reference audio that cannot be used; the message says why."""


def to_mono(samples: np.ndarray) -> np.ndarray:
    """float32 mono: 1-D as is, 2-D (frames, channels) by channel mean (the official loader's rule)."""
    a = np.asarray(samples)
    if a.ndim == 2:
        a = a.mean(axis=1)
    elif a.ndim != 1:
        raise AudioInputError(f"audio must be 1-D (samples) or 2-D (samples, channels), got shape {a.shape}")
    if not np.issubdtype(a.dtype, np.floating):
        raise AudioInputError(f"audio samples must be floating point in [-1, 1], got {a.dtype}")
    a = a.astype(np.float32, copy=False)
    if not np.all(np.isfinite(a)):
        raise AudioInputError("audio contains NaN or infinite samples")
    return a


def resample(samples: np.ndarray, rate: int, target: int = ENCODER_SAMPLE_RATE) -> np.ndarray:
    """Mono float32 at ``target`` Hz, ``ceil(n * (target / rate))`` samples (soxr HQ, as librosa's default)."""
    if isinstance(rate, bool) or not isinstance(rate, int | np.integer) or rate <= 0:
        raise AudioInputError(f"sample rate must be a positive integer, got {rate!r}")
    mono = to_mono(samples)
    if rate == target:
        return mono
    import soxr

    out = soxr.resample(mono, rate, target, quality="HQ").astype(np.float32, copy=False)
    # librosa's fix=True length, computed as librosa does (float ratio): 88200 samples at 44.1 kHz give 48001.
    n = math.ceil(len(mono) * (target / rate))
    if len(out) < n:  # pad with zeros or trim to exactly that length
        out = np.pad(out, (0, n - len(out)))
    return out[:n]


def load_reference(source: str | Path | tuple[np.ndarray, int]) -> np.ndarray:
    """A reference clip (file soundfile reads: wav/flac/ogg/mp3, or ``(samples, rate)``) as mono 24 kHz float32."""
    if isinstance(source, tuple):
        if len(source) != 2:
            raise AudioInputError("pass audio as (samples, sample_rate)")
        samples, rate = source
        return resample(samples, rate)
    import soundfile as sf

    path = Path(source)
    if not path.is_file():
        raise AudioInputError(f"reference audio {path} does not exist")
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=False)
    except (sf.LibsndfileError, RuntimeError) as exc:
        raise AudioInputError(f"cannot read {path} as audio ({exc}); use wav, flac, ogg or mp3") from exc
    if len(samples) == 0:
        raise AudioInputError(f"{path} holds no samples")
    return resample(samples, int(rate))


def describe_source(source: str | Path | tuple[np.ndarray, int]) -> dict:
    """Provenance of a reference: sha256 of the file or the samples, original rate and duration."""
    import hashlib

    if isinstance(source, tuple):
        samples, rate = source
        data = np.ascontiguousarray(samples, dtype=np.float32)
        return {"source": "array", "sha256": hashlib.sha256(data.tobytes()).hexdigest(), "rate": int(rate),
                "seconds": round(len(data) / int(rate), 3)}
    import soundfile as sf

    path = Path(source)
    info = sf.info(str(path))
    return {"source": path.name, "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
            "rate": int(info.samplerate), "channels": int(info.channels), "seconds": round(info.duration, 3)}
