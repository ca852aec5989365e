"""Shared fixtures: one cache for derived artifacts per checkout, tiny checkpoints and bundles built once."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Keep random checkpoints and converted tokenizers out of $HOME and reuse them across test runs.
os.environ.setdefault("QWEN3_TTS_EDGE_CACHE", str(REPO / ".cache" / "test"))


def _has_export_extras() -> bool:
    try:
        from qwen3_tts_edge.export.official import qwen_tts

        qwen_tts()
    except ImportError:
        return False
    return True


needs_export = pytest.mark.skipif(not _has_export_extras(), reason="needs the [export] extras (torch, qwen-tts)")


@pytest.fixture(scope="session")
def tiny_checkpoint() -> Path:
    """Folder of the random tiny CustomVoice checkpoint (official layout)."""
    from qwen3_tts_edge.export.sources import resolve_model

    return resolve_model("random:tiny-custom_voice").path


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory) -> Path:
    """A bundle exported from random:tiny-custom_voice with every stage and both generation engines (llama.cpp
    f32 + q8_0, ONNX Runtime fp32; read-only for tests)."""
    from qwen3_tts_edge.export.build import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle("random:tiny-custom_voice", out, talker=["f32", "q8_0", "fp32"], decoder=["fp32"],
                  progress=lambda msg: None)
    return out


@pytest.fixture(scope="session")
def base_bundle(tmp_path_factory) -> Path:
    """A bundle exported from random:tiny-base: talker f32 + q8_0, decoder fp32, both voice encoders."""
    from qwen3_tts_edge.export.build import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny-base"
    export_bundle("random:tiny-base", out, talker=["f32", "q8_0"], decoder=["fp32"], progress=lambda msg: None)
    return out


@pytest.fixture(scope="session")
def ref_wav(tmp_path_factory) -> Path:
    """A 2 s voiced-sounding reference clip: stereo, 44.1 kHz (so loading resamples and mixes down)."""
    import numpy as np
    import soundfile as sf

    n, rate = 44100 * 2, 44100
    t = np.arange(n) / rate
    phase = 2 * np.pi * np.cumsum(130 + 30 * np.sin(2 * np.pi * 0.9 * t)) / rate
    y = 0.3 * sum(np.sin(k * phase) / k for k in range(1, 9))
    path = tmp_path_factory.mktemp("ref") / "ref.wav"
    sf.write(path, np.stack([y, 0.5 * y], axis=1), rate)
    return path


ESPEAK = shutil.which("espeak-ng")
needs_espeak = pytest.mark.skipif(ESPEAK is None, reason="needs espeak-ng for spoken reference clips (Debian "
                                  "package espeak-ng; `make setup` installs it when run as root)")


def spoken_clip(path: Path, text: str, *, voice: str = "en", speed: int = 160, rate: int = 22050,
                seconds: float | None = None, channels: int = 1) -> Path:
    """Speech made by espeak-ng (22.05 kHz), repeated or cut to ``seconds``, resampled to ``rate`` and spread over
    ``channels`` (each a little quieter than the last), written where ``path`` says (format from its suffix)."""
    import numpy as np
    import soundfile as sf
    import soxr

    raw = path.with_suffix(".espeak.wav")
    subprocess.run([ESPEAK, "-v", voice, "-s", str(speed), "-w", str(raw), text], check=True, capture_output=True)
    y, native = sf.read(raw, dtype="float32")
    raw.unlink()
    if seconds is not None:
        n = int(round(seconds * native))
        y = np.tile(y, -(-n // len(y)))[:n]
    if rate != native:
        y = soxr.resample(y, native, rate)
    if channels > 1:
        y = np.stack([y * (1 - 0.1 * c) for c in range(channels)], axis=1)
    sf.write(path, y, rate)
    return path


async def llm_reply(text: str, seed: int, max_delay_s: float = 0.02):
    """An LLM's reply: a few characters at a time, with random pauses between them (seeded)."""
    import asyncio
    import random

    rng = random.Random(seed)
    i = 0
    while i < len(text):
        n = rng.randint(1, 4)
        yield text[i:i + n]
        i += n
        if rng.random() < 0.6:
            await asyncio.sleep(rng.uniform(0.0, max_delay_s))
