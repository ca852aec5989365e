"""Cloning from real speech: espeak-ng clips in six languages, at speeds, source rates (8 to 96 kHz), channel
layouts (mono, stereo, 5.1), containers and lengths from 1 s to 30 s (none a multiple of the 1920-sample frame).

Each step of ours equals the official path on the same file (``librosa.load`` + ``librosa.resample``, the
official ``mel_spectrogram``, ``extract_speaker_embedding`` and tokenizer ``encode``, all fp32): the 24 kHz wave,
the log-mel, the x-vector (cosine) and the codec codes (no mismatch at all).
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import needs_espeak, needs_export, spoken_clip

pytestmark = [needs_export, needs_espeak]

SENTENCES = {
    "en": "The quick brown fox jumps over the lazy dog, and then it rests in the warm afternoon sun.",
    "de": "Heute Morgen habe ich frisches Brot beim Bäcker an der Ecke gekauft.",
    "cmn": "今天天气很好，我们一起去公园散步吧。",
    "fr": "Il était une fois, dans un petit village au bord de la mer, un pêcheur très patient.",
    "es": "Mañana por la tarde vamos a visitar a mis abuelos en el campo.",
    "ja": "今日はとても良い天気ですね。一緒に散歩に行きましょう。",
}
# name: (espeak voice, words per minute, source rate, seconds, channels, container)
CLIPS = {
    "en-16k-1s": ("en", 175, 16000, 1.37, 1, "wav"),
    "de-22k-4s-flac": ("de", 140, 22050, 4.21, 1, "flac"),
    "cmn-44k-8s-stereo": ("cmn", 160, 44100, 7.93, 2, "wav"),
    "es-8k-3s": ("es", 150, 8000, 3.1, 1, "wav"),
    "ja-96k-3s-5.1": ("ja", 165, 96000, 2.6, 6, "wav"),
    "fr-48k-30s-ogg": ("fr", 190, 48000, 29.97, 1, "ogg"),
    "en-24k-6s-mp3": ("en", 120, 24000, 6.05, 1, "mp3"),
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spoken")
    return {name: spoken_clip(folder / f"{name}.{ext}", SENTENCES[voice], voice=voice, speed=speed, rate=rate,
                              seconds=seconds, channels=channels)
            for name, (voice, speed, rate, seconds, channels, ext) in CLIPS.items()}


@pytest.fixture(scope="module")
def official():
    from qwen3_tts_edge.export.decoder_onnx import load_official_tokenizer
    from qwen3_tts_edge.export.sources import resolve_model
    from qwen3_tts_edge.export.torch_reference import load_official

    path = resolve_model("random:tiny-base").path
    return load_official(path), load_official_tokenizer(path)


@pytest.fixture(scope="module")
def ours(base_bundle):
    from qwen3_tts_edge.runtime.bundle import load_bundle
    from qwen3_tts_edge.runtime.engine.assemble import load_stage

    bundle = load_bundle(base_bundle)
    return (load_stage("speaker_encoder", bundle, "fp32", threads=1),
            load_stage("codec_encoder", bundle, "fp32", threads=1))


def _official_wave(path) -> np.ndarray:
    """The official ``create_voice_clone_prompt`` loading: librosa.load(sr=None, mono) + librosa.resample."""
    import librosa

    y, sr = librosa.load(path, sr=None, mono=True)
    return y if sr == 24000 else librosa.resample(y, orig_sr=sr, target_sr=24000)


def _mel_float64(wave: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """The official mel_spectrogram's operations (reflect pad, torch.stft, sqrt(+1e-9), slaney matmul, log clamp)
    run in float64 instead of float32."""
    import torch

    y = torch.nn.functional.pad(torch.from_numpy(wave.astype(np.float64))[None, None], (384, 384), mode="reflect")[0]
    spec = torch.stft(y, 1024, hop_length=256, win_length=1024, window=torch.hann_window(1024, dtype=torch.float64),
                      center=False, normalized=False, onesided=True, return_complex=True)
    mag = torch.sqrt(torch.view_as_real(spec).pow(2).sum(-1) + 1e-9)
    mel = torch.matmul(torch.from_numpy(basis.astype(np.float64)), mag)
    return torch.log(torch.clamp(mel, min=1e-5))[0].T.numpy()


@pytest.mark.parametrize("name", list(CLIPS))
def test_spoken_reference_equals_the_official_path(name, clips, official, ours):
    import torch

    from qwen3_tts_edge.export.codec_encoder_onnx import official_codes
    from qwen3_tts_edge.export.official import qwen_tts
    from qwen3_tts_edge.runtime.voices.audio_in import load_reference
    from qwen3_tts_edge.runtime.voices.mel import log_mel

    qwen_tts()
    from qwen_tts.core.models.modeling_qwen3_tts import mel_spectrogram

    model, tokenizer = official
    speaker, codec = ours
    torch.set_num_threads(1)
    wave, ref_wave = load_reference(clips[name]), _official_wave(clips[name])
    assert len(wave) == len(ref_wave) and len(wave) % 1920 != 0
    assert np.max(np.abs(wave - ref_wave)) < 1e-6
    assert np.max(np.abs(wave)) > 0.05  # speech, not silence

    ref_mel = mel_spectrogram(torch.from_numpy(wave)[None], n_fft=1024, num_mels=128, sampling_rate=24000,
                              hop_size=256, win_size=1024, fmin=0, fmax=12000).transpose(1, 2)[0].numpy()
    mel = log_mel(wave, speaker.mel_filters)
    assert mel.shape == ref_mel.shape
    # The official fp32 STFT's own rounding reaches ~1e-4 (log domain) in low-energy bins, so the check is that
    # every difference is that rounding: ours equals the same formula in float64 and deviates from the fp32
    # official no more than float64 does.
    exact = _mel_float64(wave, speaker.mel_filters)
    assert np.max(np.abs(mel - exact)) <= 1e-5
    assert np.all(np.abs(mel - ref_mel) <= np.abs(exact - ref_mel) + 1e-5)

    x_vector = speaker.embed(wave)
    with torch.no_grad():
        ref_x = model.extract_speaker_embedding(ref_wave, 24000).float().numpy()
    cos = float(x_vector @ ref_x / (np.linalg.norm(x_vector) * np.linalg.norm(ref_x)))
    assert cos >= 0.99999, cos

    codes, ref_codes = codec.encode(wave), official_codes(tokenizer, ref_wave)
    assert codes.shape == ref_codes.shape == (-(-len(wave) // 1920), 16)
    assert int((codes != ref_codes).sum()) == 0


def test_a_spoken_voice_speaks_through_the_cli(base_bundle, clips, tmp_path):
    """From the outside: voice create from a German FLAC with its transcript in a file, then speak with it;
    one-shot --ref-audio gives the same audio for the same seed."""
    import subprocess
    import sys
    from pathlib import Path

    import soundfile as sf

    exe = str(Path(sys.executable).parent / "qwen3-tts-edge")
    transcript = tmp_path / "ref.txt"
    transcript.write_text(SENTENCES["de"] + "\n", encoding="utf-8")
    voice = tmp_path / "de.voice"
    run = [exe, "voice", "create", str(clips["de-22k-4s-flac"]), "-b", str(base_bundle), "-o", str(voice),
           "--text-file", str(transcript), "--language", "german"]
    res = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    speak = [exe, "speak", "Guten Abend.", "-b", str(base_bundle), "--seed", "3", "--max-frames", "8",
             "--language", "german"]
    a, b = tmp_path / "a.wav", tmp_path / "b.wav"
    res = subprocess.run([*speak, "--voice", str(voice), "-o", str(a)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([*speak, "--ref-audio", str(clips["de-22k-4s-flac"]), "--ref-text-file", str(transcript),
                          "-o", str(b)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    ya, yb = sf.read(a)[0], sf.read(b)[0]
    assert len(ya) > 0 and np.array_equal(ya, yb)
