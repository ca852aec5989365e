"""Known-harmless third-party chatter during an export, kept out of the progress lines.

An export imports torch, transformers, qwen_tts, onnxscript and onnxruntime's quantizers; together they printed
pages of INFO logs and warnings between our progress lines (onnxruntime's MatMulNBits quantizer even calls
``logging.basicConfig(level=INFO)`` at import, which turns on every library's INFO records). Each row below is
one source with the reason it is harmless; anything not listed still shows, so a real problem stays visible.
``QWEN3_TTS_EDGE_EXPORT_VERBOSE=1`` shows everything again.
"""

from __future__ import annotations

import logging
import os
import warnings

# logger name -> (level from which its records show, why the records below it are harmless)
LOGGERS: dict[str, tuple[int, str]] = {
    "onnx_ir": (logging.WARNING, "graph passes report each deduplicated initializer and removed node (INFO)"),
    "onnxscript": (logging.WARNING, "the optimizer reports every constant it chose not to fold (INFO)"),
    "qwen_tts": (logging.WARNING, "configs report default sub-configs for parts the 12 Hz models do not use"),
    "torch.onnx._internal.exporter._registration": (
        logging.ERROR, "torchvision ops (nms, roi_align, ...) are not registered: no Qwen3-TTS graph uses them"),
}
# (category, message regex, why)
WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated",
     "torch's exporter calls its own deprecated pytree API"),
    (UserWarning, r"The tensor attributes .* were assigned during export",
     "the official codec encoder caches its codebooks as plain attributes; the traced graph holds their values"),
)
VERBOSE_ENV = "QWEN3_TTS_EDGE_EXPORT_VERBOSE"


def quiet_third_party() -> None:
    """Apply the tables above (once per process; the export CLI calls it before any export import)."""
    if os.environ.get(VERBOSE_ENV):
        return
    for name, (level, _why) in LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    for category, message, _why in WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
