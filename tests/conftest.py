"""Shared fixtures: one cache for derived artifacts per checkout, tiny checkpoints and bundles built once."""

from __future__ import annotations

import os
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
    """A bundle exported from random:tiny-custom_voice with every stage (read-only for tests)."""
    from qwen3_tts_edge.export.build import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle("random:tiny-custom_voice", out, talker=["f32", "q8_0"], decoder=["fp32"], progress=lambda msg: None)
    return out
