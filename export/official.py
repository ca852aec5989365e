"""Import the official qwen-tts classes on a CPU-only machine.

qwen-tts 0.1.1 imports torchaudio at package import time, but only its 25 Hz tokenizer uses it, and PyPI
offers only CUDA builds of torchaudio that fail to load without CUDA. The 12 Hz models never touch it, so
we register an empty stand-in module (with a real ``ModuleSpec``: transformers calls ``find_spec`` on it)
before the first ``import qwen_tts``. A real, loadable torchaudio is always preferred when present.
"""

from __future__ import annotations

import contextlib
import importlib.machinery
import importlib.util
import io
import logging
import sys
import types
from functools import cache

_STUB_NAMES = ("torchaudio", "torchaudio.compliance", "torchaudio.compliance.kaldi")
QWEN_TTS_INSTALL_HINT = (
    "the export side needs the official qwen-tts package and its real dependencies: "
    "`pip install 'qwen3-tts-edge[export]' && pip install --no-deps qwen-tts==0.1.1` "
    "(or run `make setup` in a checkout)"
)


def _torchaudio_loads() -> bool:
    if "torchaudio" in sys.modules:
        return True
    if importlib.util.find_spec("torchaudio") is None:
        return False
    try:
        import torchaudio  # noqa: F401
    except Exception:  # a CUDA-only wheel raises OSError/ImportError on CPU machines
        for name in list(sys.modules):
            if name == "torchaudio" or name.startswith("torchaudio."):
                del sys.modules[name]
        return False
    return True


def _install_torchaudio_stub() -> None:
    modules = {}
    for name in _STUB_NAMES:
        mod = types.ModuleType(name)
        mod.__spec__ = importlib.machinery.ModuleSpec(name, loader=None, is_package=True)
        mod.__path__ = []
        mod.__doc__ = "qwen3-tts-edge stand-in: the 12 Hz models never call torchaudio."
        modules[name] = mod
        sys.modules[name] = mod
    modules["torchaudio"].compliance = modules["torchaudio.compliance"]
    modules["torchaudio.compliance"].kaldi = modules["torchaudio.compliance.kaldi"]


# qwen_tts's flash-attn banner: flash-attn is a CUDA kernel package; the export runs the eager attention anyway.
_BANNER_LINES = ("", "********", "Warning: flash-attn is not installed. Will only run the manual PyTorch version. "
                 "Please install flash-attn for faster inference.")


def _pass_on(printed: str) -> None:
    """What qwen_tts printed at import, to stderr, less its known flash-attn banner."""
    rest = [line for line in printed.splitlines() if line.strip() not in _BANNER_LINES]
    if rest:
        print("\n".join(rest), file=sys.stderr)


@cache
def qwen_tts() -> types.ModuleType:
    """Return the imported ``qwen_tts`` package, with its Auto* classes registered."""
    if not _torchaudio_loads():
        _install_torchaudio_stub()
    # The `sox` package warns about a missing SoX binary (only the 25 Hz tokenizer uses it) and qwen_tts
    # prints a flash-attn banner on stdout; keep both out of our output (stdout may carry PCM).
    logging.getLogger("sox").setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()) as banner:
            import qwen_tts as pkg
            from qwen_tts.core import Qwen3TTSTokenizerV2Config, Qwen3TTSTokenizerV2Model
            from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration, Qwen3TTSProcessor
            from transformers import AutoConfig, AutoModel, AutoProcessor
    except ImportError as exc:
        raise ImportError(f"cannot import qwen_tts ({exc}); {QWEN_TTS_INSTALL_HINT}") from exc
    finally:
        _pass_on(banner.getvalue())
    AutoConfig.register("qwen3_tts", Qwen3TTSConfig, exist_ok=True)
    AutoModel.register(Qwen3TTSConfig, Qwen3TTSForConditionalGeneration, exist_ok=True)
    AutoProcessor.register(Qwen3TTSConfig, Qwen3TTSProcessor, exist_ok=True)
    AutoConfig.register("qwen3_tts_tokenizer_12hz", Qwen3TTSTokenizerV2Config, exist_ok=True)
    AutoModel.register(Qwen3TTSTokenizerV2Config, Qwen3TTSTokenizerV2Model, exist_ok=True)
    return pkg
