"""Reference audio for voice cloning, torch-free: loading/resampling and the log-mel front end, each equal to
the official path (librosa load + soxr_hq resample; qwen-tts ``mel_spectrogram``)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from conftest import needs_export
from qwen3_tts_edge.runtime.voices.audio_in import AudioInputError, load_reference, resample
from qwen3_tts_edge.runtime.voices.mel import log_mel


def _speechy(n: int, rate: int, seed: int = 0) -> np.ndarray:
    """Harmonics with a wobbling pitch plus noise, peak about 0.6: a stand-in for a voice."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / rate
    f0 = 140 + 30 * np.sin(2 * np.pi * 1.3 * t)
    phase = 2 * np.pi * np.cumsum(f0) / rate
    y = sum(np.sin(k * phase) / k for k in range(1, 12)) * 0.25 + 0.02 * rng.standard_normal(n)
    return y.astype(np.float32)


def _mel_basis():
    import librosa

    return librosa.filters.mel(sr=24000, n_fft=1024, n_mels=128, fmin=0, fmax=12000)


@needs_export
@pytest.mark.parametrize("n", [24000, 24001, 100000])
def test_host_mel_equals_the_official_mel(n):
    import torch

    from qwen3_tts_edge.export.official import qwen_tts

    qwen_tts()
    from qwen_tts.core.models.modeling_qwen3_tts import mel_spectrogram

    y = _speechy(n, 24000, seed=n)
    ref = mel_spectrogram(torch.from_numpy(y)[None], n_fft=1024, num_mels=128, sampling_rate=24000, hop_size=256,
                          win_size=1024, fmin=0, fmax=12000).transpose(1, 2)[0].numpy()
    host = log_mel(y, _mel_basis())
    assert host.shape == ref.shape == (n // 256, 128)
    assert np.max(np.abs(host - ref)) < 1e-4


@needs_export
@pytest.mark.parametrize("rate", [16000, 22050, 44100, 48000])
def test_resampling_equals_librosa_default(rate):
    import librosa

    y = _speechy(rate * 2 + 7, rate)
    ours = resample(y, rate)
    ref = librosa.resample(y, orig_sr=rate, target_sr=24000)
    assert len(ours) == len(ref) == math.ceil(len(y) * (24000 / rate))
    assert np.max(np.abs(ours - ref)) < 1e-6


@needs_export
def test_a_stereo_file_loads_like_the_official_loader(tmp_path):
    import librosa
    import soundfile as sf

    left, right = _speechy(44100 * 2, 44100, seed=1), _speechy(44100 * 2, 44100, seed=2) * 0.5
    path = tmp_path / "ref.flac"
    sf.write(path, np.stack([left, right], axis=1), 44100, subtype="PCM_16")
    ours = load_reference(path)
    y, sr = librosa.load(path, sr=None, mono=True)
    ref = librosa.resample(y, orig_sr=sr, target_sr=24000)
    assert ours.dtype == np.float32 and len(ours) == len(ref)
    assert np.max(np.abs(ours - ref)) < 1e-6
    same = load_reference((sf.read(path, dtype="float32")[0], 44100))  # an array + rate gives the same clip
    assert np.array_equal(same, ours)


@pytest.mark.parametrize("source,match", [
    ((np.zeros((2, 2, 2), np.float32), 24000), "1-D"),
    ((np.zeros(100, np.int16), 24000), "floating point"),
    ((np.array([0.0, np.nan], np.float32), 24000), "NaN"),
    ((np.array([0.0, np.inf] * 2000, np.float32), 24000), "infinite"),
    ((np.zeros(24000, np.float32), 24000), r"silent \(peak all zeros\)"),
    ((np.full(24000, 1e-4, np.float32), 16000), r"silent \(peak -80 dBFS\)"),
    ((np.clip(3 * _speechy(48000, 24000), -1, 1), 24000), r"clipped \(\d+\.\d% of samples at full scale\)"),
    ((_speechy(850, 16000), 16000), r"0\.053 s long; the speaker encoder needs at least 0\.053 s"),
    ((np.zeros(100, np.float32), 0), "sample rate"),
    ((np.zeros(100, np.float32),), r"\(samples, sample_rate\)"),
])
def test_bad_audio_arrays_are_clear_errors(source, match):
    with pytest.raises(AudioInputError, match=match):
        load_reference(source)


def test_bad_files_are_clear_errors(tmp_path):
    with pytest.raises(AudioInputError, match="does not exist"):
        load_reference(tmp_path / "nope.wav")
    (tmp_path / "notes.wav").write_text("not audio")
    with pytest.raises(AudioInputError, match="cannot read .* as audio .*use wav, flac, ogg or mp3"):
        load_reference(tmp_path / "notes.wav")
    (tmp_path / "clip.m4a").write_bytes(b"\x00\x00\x00\x20ftypM4A " + bytes(200))  # an AAC container
    with pytest.raises(AudioInputError, match="cannot read .* as audio .*use wav, flac, ogg or mp3"):
        load_reference(tmp_path / "clip.m4a")


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3"])
def test_a_truncated_file_is_refused(tmp_path, ext):
    """A file cut in half (an interrupted copy) is refused, never silently read as a shorter clip."""
    import soundfile as sf

    path = tmp_path / f"ref.{ext}"
    sf.write(path, _speechy(48000, 24000), 24000)
    assert len(load_reference(path)) == 48000
    raw = path.read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(AudioInputError, match="truncated"):
        load_reference(cut)


def test_a_streamed_wav_of_unknown_length_is_not_a_truncation(tmp_path):
    """A WAV written while streaming declares its data size as 0xFFFFFFFF; it is read whole."""
    import struct

    pcm = (_speechy(24000, 24000) * 32767).astype("<i2").tobytes()
    header = (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 24000, 48000,
              2, 16) + b"data" + struct.pack("<I", 0xFFFFFFFF))
    path = tmp_path / "streamed.wav"
    path.write_bytes(header + pcm)
    assert len(load_reference(path)) == 24000


def test_too_short_for_the_encoder():
    basis = np.zeros((128, 513))
    with pytest.raises(AudioInputError, match="too short"):
        log_mel(np.zeros(1000, np.float32), basis)
    assert log_mel(np.zeros(1280, np.float32), basis).shape == (5, 128)  # the shortest the encoder takes
    with pytest.raises(AudioInputError, match="mel basis"):
        log_mel(np.zeros(24000, np.float32), np.zeros((80, 513)))


@pytest.mark.parametrize("source,match", [
    ((_speechy(61 * 8000, 8000), 8000), r"61\.0 s long; the limit is 60 s"),
    ((_speechy(24000, 24000), 200_000), r"200000 Hz; reference audio must be 8000-192000 Hz"),
    ((_speechy(10_000, 100), 100), r"100 Hz; reference audio must be 8000-192000 Hz"),
])
def test_clips_out_of_bounds_are_refused_before_resampling(source, match):
    """100 s at 100 Hz would resample to 2.4 M samples (a 10 MB file: 10^9); a clip over the length limit is
    refused whatever its mode (x-vector voices had no length check)."""
    with pytest.raises(AudioInputError, match=match):
        load_reference(source)


def test_a_file_is_bounded_by_its_header_before_decoding(tmp_path):
    """A FLAC of constant blocks: 30 minutes of silence in a few kB. Refused from the header (its length), not
    after decoding 14 M samples (which would then be refused as silent)."""
    import soundfile as sf

    path = tmp_path / "long.flac"
    sf.write(path, np.zeros(30 * 60 * 8000, np.int16), 8000, subtype="PCM_16")
    assert path.stat().st_size < 200_000
    with pytest.raises(AudioInputError, match=r"1800\.0 s long; the limit is 60 s"):
        load_reference(path)
    low = tmp_path / "low.wav"
    sf.write(low, _speechy(10_000, 100), 100)
    with pytest.raises(AudioInputError, match=r"sampled at 100 Hz"):
        load_reference(low)
    ok = tmp_path / "ok.wav"
    sf.write(ok, _speechy(59 * 8000, 8000), 8000)  # under the limit: read whole, resampled
    assert len(load_reference(ok)) == 59 * 24000
    assert len(load_reference(ok, max_seconds=60)) == 59 * 24000
    with pytest.raises(AudioInputError, match=r"59\.0 s long; the limit is 10 s"):
        load_reference(ok, max_seconds=10)


def test_a_streamed_wav_of_unknown_length_is_bounded_too(tmp_path):
    """A streamed WAV says 'unknown length' (0xFFFFFFFF): the read is capped at the limit all the same."""
    import struct

    pcm = (_speechy(61 * 8000, 8000) * 32767).astype("<i2").tobytes()
    header = (b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVEfmt " + struct.pack("<IHHIIHH", 16, 1, 1, 8000, 16000,
              2, 16) + b"data" + struct.pack("<I", 0xFFFFFFFF))
    path = tmp_path / "streamed.wav"
    path.write_bytes(header + pcm)
    with pytest.raises(AudioInputError, match=r"61\.0 s long; the limit is 60 s"):
        load_reference(path)
