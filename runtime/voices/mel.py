"""The speaker encoder's log-mel front end on the host, equal to the official ``mel_spectrogram`` call.

Official settings (``extract_speaker_embedding``): 24 kHz mono, reflect pad (n_fft - hop) / 2 = 384 each side,
STFT n_fft 1024, hop 256, periodic Hann window, no centering; magnitude ``sqrt(re^2 + im^2 + 1e-9)``; a
128 x 513 slaney mel matrix (librosa's ``filters.mel(sr=24000, n_fft=1024, n_mels=128, fmin=0, fmax=12000)``,
stored in the bundle at export time so the runtime needs no librosa); ``ln(max(mel, 1e-5))``. Output frames
``floor(n / 256)``, laid out ``[T, 128]`` as the encoder takes it. Computed in float64, returned as float32.
"""

from __future__ import annotations

import numpy as np

from .audio_in import AudioInputError

N_FFT = 1024
HOP = 256
N_MELS = 128
# The encoder's convolutions reflect-pad up to 4 frames, so shorter inputs cannot run (about 53 ms of audio).
MIN_FRAMES = 5


def periodic_hann(n: int = N_FFT) -> np.ndarray:
    """torch.hann_window(n) (periodic): 0.5 - 0.5 cos(2 pi k / n)."""
    return 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(n) / n)


def log_mel(samples: np.ndarray, mel_basis: np.ndarray) -> np.ndarray:
    """``[T, 128]`` float32 log-mel of mono 24 kHz ``samples`` with the stored ``mel_basis`` (128 x 513)."""
    y = np.asarray(samples, dtype=np.float64).reshape(-1)
    basis = np.asarray(mel_basis, dtype=np.float64)
    if basis.shape != (N_MELS, N_FFT // 2 + 1):
        raise AudioInputError(f"mel basis must be {N_MELS} x {N_FFT // 2 + 1}, got {basis.shape}")
    pad = (N_FFT - HOP) // 2
    if len(y) <= pad:
        raise AudioInputError(f"reference audio too short: {len(y)} samples; need at least "
                              f"{MIN_FRAMES * HOP} (about {MIN_FRAMES * HOP / 24000 * 1000:.0f} ms)")
    y = np.pad(y, (pad, pad), mode="reflect")
    frames = 1 + (len(y) - N_FFT) // HOP
    if frames < MIN_FRAMES:
        raise AudioInputError(f"reference audio too short: {frames} mel frames; need at least {MIN_FRAMES} "
                              f"({MIN_FRAMES * HOP} samples at 24 kHz)")
    idx = np.arange(N_FFT)[None, :] + HOP * np.arange(frames)[:, None]
    spec = np.fft.rfft(y[idx] * periodic_hann(), axis=1)
    mag = np.sqrt(spec.real ** 2 + spec.imag ** 2 + 1e-9)
    mel = mag @ basis.T
    return np.log(np.maximum(mel, 1e-5)).astype(np.float32)
