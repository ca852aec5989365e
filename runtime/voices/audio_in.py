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
# The speaker encoder needs 5 mel frames (hop 256 after a 384-sample reflect pad each side): 1280 samples.
MIN_SAMPLES = 1280
SILENCE_PEAK = 1e-3  # -60 dBFS: below this the clip holds no usable voice
CLIP_LEVEL, CLIP_FRACTION = 0.999, 0.01  # 1 % of samples at full scale: a clipped (distorted) recording
# Bounds checked on the header, before a sample is decoded: a small file can declare billions of frames (a FLAC of
# constant blocks) or a rate that resamples into gigabytes (10 MB of WAV at 100 Hz is 1e9 samples at 24 kHz).
MAX_REFERENCE_S = 60.0  # 3-10 s clones best; an ICL voice also has to fit half the talker context
RATE_RANGE = (8000, 192000)


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


def _sample_rate(rate) -> int:
    if isinstance(rate, bool) or not isinstance(rate, int | np.integer) or rate <= 0:
        raise AudioInputError(f"sample rate must be a positive integer, got {rate!r}")
    return int(rate)


def check_bounds(frames: int, rate: int, name: str = "reference audio",
                 max_seconds: float = MAX_REFERENCE_S) -> None:
    """Refuse a clip by its length and rate alone, so that nothing is decoded or resampled for a clip that is
    refused anyway."""
    if not RATE_RANGE[0] <= rate <= RATE_RANGE[1]:
        raise AudioInputError(f"{name} is sampled at {rate} Hz; reference audio must be {RATE_RANGE[0]}-"
                              f"{RATE_RANGE[1]} Hz (resample it, e.g. `sox in.wav -r 24000 out.wav`)")
    if frames > max_seconds * rate:
        raise AudioInputError(f"{name} is {frames / rate:.1f} s long; the limit is {max_seconds:g} s: trim it "
                              "(3-10 s of clear speech clones best)")


def resample(samples: np.ndarray, rate: int, target: int = ENCODER_SAMPLE_RATE) -> np.ndarray:
    """Mono float32 at ``target`` Hz, ``ceil(n * (target / rate))`` samples (soxr HQ, as librosa's default)."""
    return _resample_mono(to_mono(samples), _sample_rate(rate), target)


def _resample_mono(mono: np.ndarray, rate: int, target: int = ENCODER_SAMPLE_RATE) -> np.ndarray:
    if rate == target:
        return mono
    import soxr

    out = soxr.resample(mono, rate, target, quality="HQ").astype(np.float32, copy=False)
    # librosa's fix=True length, computed as librosa does (float ratio): 88200 samples at 44.1 kHz give 48001.
    n = math.ceil(len(mono) * (target / rate))
    if len(out) < n:  # pad with zeros or trim to exactly that length
        out = np.pad(out, (0, n - len(out)))
    return out[:n]


def check_reference(mono: np.ndarray, rate: int, name: str = "reference audio") -> None:
    """Refuse clips that cannot give a usable voice: too short for the encoder, silent, or clipped."""
    seconds = len(mono) / rate
    if math.ceil(len(mono) * (ENCODER_SAMPLE_RATE / rate)) < MIN_SAMPLES:
        raise AudioInputError(f"{name} is {seconds:.3f} s long; the speaker encoder needs at least "
                              f"{MIN_SAMPLES / ENCODER_SAMPLE_RATE:.3f} s (3-10 s of clear speech clones best)")
    peak = float(np.max(np.abs(mono)))
    if peak < SILENCE_PEAK:
        level = f"{20 * math.log10(peak):.0f} dBFS" if peak > 0 else "all zeros"
        raise AudioInputError(f"{name} is silent (peak {level}); use a clip with the voice in it")
    clipped = float(np.mean(np.abs(mono) >= CLIP_LEVEL))
    if clipped >= CLIP_FRACTION:
        raise AudioInputError(f"{name} is clipped ({clipped:.1%} of samples at full scale), which distorts the "
                              "cloned voice; record it at a lower level or pick another clip")


def _ogg_ends(path: Path) -> bool:
    """Whether the last Ogg page has the end-of-stream flag (header type bit 2) that every finished file ends on."""
    with open(path, "rb") as f:
        f.seek(max(0, path.stat().st_size - 65536))
        tail = f.read()
    last = tail.rfind(b"OggS")
    return last >= 0 and len(tail) > last + 5 and bool(tail[last + 5] & 0x04)


def _read_file(path: Path, max_seconds: float = MAX_REFERENCE_S) -> tuple[np.ndarray, int]:
    """All samples of an audio file; a file cut short (a truncated download or copy) is an error.

    The header is checked first (``check_bounds``) and the read is capped at the limit, so a header that
    understates its length still cannot make the read unbounded. Blocks are mixed to mono as they are read (the
    channel mean of ``to_mono``), so many channels cost no more memory than one."""
    import re

    import soundfile as sf

    try:
        with sf.SoundFile(str(path)) as f:  # one open: the header facts and the samples
            fmt, frames, rate, extra = f.format, f.frames, f.samplerate, f.extra_info
            check_bounds(frames, rate, str(path), max_seconds)
            cap = int(max_seconds * rate)
            parts, got = [], 0
            while got <= cap:  # f.read, not f.blocks: blocks pads a short read (a cut MP3) to the block size
                block = f.read(frames=min(1 << 16, cap + 1 - got), dtype="float32", always_2d=True)
                if not len(block):
                    break
                parts.append(block[:, 0].copy() if block.shape[1] == 1 else block.mean(axis=1))
                got += len(block)
        samples = np.concatenate(parts) if parts else np.zeros(0, np.float32)
        if len(samples) > cap:
            check_bounds(len(samples), rate, str(path), max_seconds)
    except (sf.LibsndfileError, RuntimeError) as exc:
        why = str(exc).strip()
        if "malformed" in why or "lost sync" in why or "decoder" in why:  # a known format, damaged inside
            raise AudioInputError(f"{path} is damaged or truncated ({why}); copy or download it again") from exc
        raise AudioInputError(f"cannot read {path} as audio ({why}); use wav, flac, ogg or mp3") from exc
    # libsndfile reads what is there of a cut WAV and says so only in its header dump; a streamed WAV's
    # "unknown length" sizes (0, 0xFFFFFFFF) are not a cut.
    declared = re.search(r"^data : (\d+) \(should be (\d+)\)", extra, re.MULTILINE)
    short = declared is not None and 0 < int(declared.group(2)) < int(declared.group(1)) < 0xFFFFFFF0
    # Compressed formats state their length up front (MP3's is an estimate: allow 2 %).
    if fmt == "MP3":
        short = short or len(samples) < 0.98 * frames
    elif fmt == "OGG":  # Ogg states no length, but its last page carries the end-of-stream flag
        short = short or not _ogg_ends(path)
    elif frames > 0 and fmt != "WAV":
        short = short or len(samples) < frames
    if short:
        raise AudioInputError(f"{path} is truncated (its header promises more audio than the file holds); "
                              "copy or download it again")
    return samples, int(rate)


def load_reference(source: str | Path | tuple[np.ndarray, int], max_seconds: float = MAX_REFERENCE_S) -> np.ndarray:
    """A reference clip (file soundfile reads: wav/flac/ogg/mp3, or ``(samples, rate)``) as mono 24 kHz float32.

    Any channel count (the official loader's channel mean) and any rate in ``RATE_RANGE``; at most ``max_seconds``
    long (``check_bounds``, before decoding); checked by ``check_reference``.
    """
    if isinstance(source, tuple):
        if len(source) != 2:
            raise AudioInputError("pass audio as (samples, sample_rate)")
        samples, rate = source
        name = "reference audio"
        check_bounds(len(samples), _sample_rate(rate), name, max_seconds)
    else:
        path = Path(source)
        if not path.is_file():
            raise AudioInputError(f"reference audio {path} does not exist")
        samples, rate = _read_file(path, max_seconds)
        if len(samples) == 0:
            raise AudioInputError(f"{path} holds no samples")
        name = str(path)
    mono, rate = to_mono(samples), _sample_rate(rate)
    check_reference(mono, rate, name)
    return _resample_mono(mono, rate)


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
    with open(path, "rb") as f:  # in blocks: the file is not read into memory whole
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    return {"source": path.name, "sha256": digest,
            "rate": int(info.samplerate), "channels": int(info.channels), "seconds": round(info.duration, 3)}
