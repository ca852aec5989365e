"""ONNX Runtime engines: the stateful streaming codec decoder (CPU, CUDA or TensorRT execution providers)."""

from __future__ import annotations

from collections.abc import Sequence

from ...bundle import Bundle


def load_decoder(bundle: Bundle, precision: str, *, providers: Sequence[str] | None = None,
                 threads: int | None = None):
    """The bundle's decoder at ``precision`` as a :class:`~.decoder.StreamingDecoder`."""
    from .decoder import StreamingDecoder

    return StreamingDecoder(bundle.path(bundle.manifest.component("decoder", precision)), providers=providers,
                            threads=threads)
