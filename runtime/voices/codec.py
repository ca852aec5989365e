"""Reference audio → codec codes ``[T, 16]`` with the bundle's codec encoder graph (ICL voices), torch-free.

Equal to the official ``encode`` on the same 24 kHz wave (the export checks 0 code mismatches); the wave is
neither padded nor truncated, so the last, partial frame is the official one too.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle import Bundle
from .audio_in import AudioInputError

MIN_SAMPLES = 1920  # one 80 ms frame at 24 kHz


class CodecEncoder:
    """``encode(samples_24k)`` → ``(ceil(n / 1920), 16)`` int64 codes."""

    def __init__(self, graph: Path | str, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        self.providers = self.session.get_providers()

    def encode(self, samples: np.ndarray) -> np.ndarray:
        wave = np.ascontiguousarray(samples, dtype=np.float32).reshape(1, -1)
        if wave.shape[1] < MIN_SAMPLES:
            raise AudioInputError(f"reference audio too short for the codec encoder: {wave.shape[1]} samples; "
                                  f"need at least {MIN_SAMPLES} (80 ms at 24 kHz)")
        return self.session.run(None, {"wave": wave})[0].astype(np.int64, copy=False)


def load_codec_encoder(bundle: Bundle, precision: str = "fp32", *, threads: int | None = None) -> CodecEncoder:
    return CodecEncoder(bundle.path(bundle.manifest.component("codec_encoder", precision)), threads=threads)
