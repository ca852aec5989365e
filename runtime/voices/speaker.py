"""The x-vector of a reference clip: host log-mel → the bundle's speaker encoder graph (ONNX Runtime, fp32).

Equal to the official ``extract_speaker_embedding`` on the same 24 kHz audio (in fp32; the official default
runs the encoder in the model dtype, bf16, which is coarser). The x-vector is the talker input row of the
speaker in a clone prompt, so its width is the talker's hidden size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..bundle import Bundle
from .audio_in import load_reference
from .mel import log_mel


class SpeakerEncoder:
    """``embed(samples_24k)`` → ``(enc_dim,)`` float32 x-vector; ``embed_file(path)`` loads and resamples first."""

    def __init__(self, graph: Path | str, mel_filters: Path | str, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        self.providers = self.session.get_providers()
        self.mel_filters = np.load(mel_filters)
        self.enc_dim = int(self.session.get_outputs()[0].shape[-1])

    def embed(self, samples: np.ndarray) -> np.ndarray:
        mel = log_mel(samples, self.mel_filters)[None]
        return self.session.run(None, {"mel": mel})[0][0].astype(np.float32, copy=False)

    def embed_file(self, source) -> np.ndarray:
        return self.embed(load_reference(source))


def load_speaker_encoder(bundle: Bundle, precision: str = "fp32", *, threads: int | None = None) -> SpeakerEncoder:
    """The bundle's speaker encoder (a Base bundle; ``BundleError`` names what is missing otherwise)."""
    m = bundle.manifest
    return SpeakerEncoder(bundle.path(m.component("speaker_encoder", precision)),
                          bundle.path(m.component("speaker_mel", precision)), threads=threads)
