"""Random-weight Qwen3-TTS checkpoints in the official on-disk layout.

No model hub is reachable on our machines, so tests and benchmarks run on checkpoints built from the
official qwen-tts classes at the shipped configuration, with deterministic random weights. They are
written exactly like a downloaded snapshot (config.json, generation_config.json, bf16 model.safetensors,
text tokenizer files, speech_tokenizer/ in fp32) so that every exporter has one loading path.

Weights are variance-preserving (std = gain / sqrt(fan_in)) rather than the class init, so that
activations stay in a realistic range at every width; codec codebooks are randomised because a fresh
codebook (embedding_sum = 0) makes the decoder output silence.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from . import shapes
from .cache import cache_root
from .official import qwen_tts

# Bump when the weight recipe or layout changes: cached checkpoints of another version are rebuilt.
RECIPE_VERSION = 1

_SKIP_TYPES = ("int", "long", "bool", "uint8")

# Gains for weight matrices whose default variance-preserving scale would let activations explode:
# residual-branch outputs of the codec decoder and its final waveform conv (checked: with gain 1 the
# decoder grows ~3x per upsampling block and clips 98 % of samples). First match wins.
GAIN_RULES: tuple[tuple[str, float], ...] = (
    (r"^decoder\.decoder\.\d+\.block\.\d+\.conv2\.conv\.weight$", 0.25),
    (r"(^|\.)o_proj\.weight$|(^|\.)down_proj\.weight$|(^|\.)fc2\.weight$", 0.5),
)
CODEBOOK_STD = 0.3
FINAL_CONV_GAIN = 0.05


def _generator(seed: int, name: str):
    import torch

    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _fan_in(module: Any, weight: Any) -> int:
    import torch

    if isinstance(module, torch.nn.ConvTranspose1d):
        # Each output sample sees in_channels * kernel / stride inputs.
        return max(1, weight.shape[0] * weight.shape[2] // module.stride[0])
    return max(1, math.prod(weight.shape[1:]))


def _fill(name: str, tensor: Any, module: Any, seed: int, gain: float = 1.0) -> None:
    """Overwrite one parameter/buffer in place with its deterministic random value."""
    import torch

    if any(t in str(tensor.dtype) for t in _SKIP_TYPES):
        return
    g = _generator(seed, name)
    leaf = name.rsplit(".", 1)[-1]
    kind = type(module).__name__

    def normal(std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(tensor.shape, generator=g, dtype=torch.float32) * std + mean

    if leaf in ("embedding_sum", "embed_sum"):
        value = normal(CODEBOOK_STD)
    elif leaf == "cluster_usage":
        value = torch.rand(tensor.shape, generator=g) * 1.5 + 0.5
    elif leaf == "initialized":
        value = torch.ones(tensor.shape)
    elif leaf == "running_var":
        value = torch.rand(tensor.shape, generator=g) * 0.5 + 0.75
    elif leaf == "running_mean":
        value = normal(0.05)
    elif leaf in ("alpha", "beta"):  # SnakeBeta log-scale parameters
        value = normal(0.1)
    elif leaf in ("scale", "gamma"):  # LayerScale / ConvNeXt gamma: small residual branches, as trained
        value = normal(0.01, 0.05)
    elif leaf == "weight" and tensor.dim() == 1:  # RMSNorm / LayerNorm / BatchNorm gains
        value = normal(0.05, 1.0)
    elif leaf == "bias" or kind == "Embedding":
        value = normal(0.02)
    elif leaf == "weight" and tensor.dim() >= 2:
        value = normal(gain / math.sqrt(_fan_in(module, tensor)))
    else:
        raise ValueError(f"no random-init rule for tensor {name} ({kind}, shape {tuple(tensor.shape)})")
    with torch.no_grad():
        tensor.copy_(value.to(tensor.dtype))


def randomize_(model: Any, seed: int) -> None:
    """Deterministically re-initialise every float parameter and buffer of ``model`` from ``seed``."""
    modules = dict(model.named_modules())
    state = model.state_dict(keep_vars=True)
    final_conv = _final_waveform_conv(state)
    for name, tensor in state.items():
        gain = FINAL_CONV_GAIN if name == final_conv else _gain(name)
        _fill(name, tensor.data, modules.get(name.rsplit(".", 1)[0]), seed, gain)


def _gain(name: str) -> float:
    for pattern, gain in GAIN_RULES:
        if re.search(pattern, name):
            return gain
    return 1.0


def _final_waveform_conv(state: dict[str, Any]) -> str | None:
    """Name of the codec decoder's last conv (channels -> 1 waveform), if the model has one."""
    convs = [n for n in state if re.fullmatch(r"decoder\.decoder\.(\d+)\.conv\.weight", n)]
    return max(convs, key=lambda n: int(n.split(".")[2])) if convs else None


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _released_config(config: dict[str, Any], dtype: str) -> dict[str, Any]:
    import transformers

    return dict(config, torch_dtype=dtype, transformers_version=transformers.__version__)


def build_random_checkpoint(shape: str, variant: str, seed: int, out_dir: Path) -> Path:
    """Write a random checkpoint for ``shape`` × ``variant`` into the new folder ``out_dir``."""
    import torch

    from .tokenizer_files import write_tokenizer_files

    qwen_tts()
    from qwen_tts.core import Qwen3TTSTokenizerV2Config, Qwen3TTSTokenizerV2Model
    from qwen_tts.core.models import Qwen3TTSConfig, Qwen3TTSForConditionalGeneration

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=False)
    torch.manual_seed(seed)

    config = Qwen3TTSConfig(**shapes.model_config(shape, variant))
    model = Qwen3TTSForConditionalGeneration(config)
    randomize_(model, seed)
    model.to(torch.bfloat16)  # the released model.safetensors files are bf16
    model.save_pretrained(out_dir, safe_serialization=True)
    del model
    # save_pretrained serialises every PretrainedConfig attribute, which the official speaker-encoder
    # config class rejects on load; the released files hold just the shipped keys, so write those.
    _write_json(out_dir / "config.json", _released_config(shapes.model_config(shape, variant), "bfloat16"))
    _write_json(out_dir / "generation_config.json", dict(shapes.GENERATION_CONFIG))
    write_tokenizer_files(out_dir)

    st_dir = out_dir / "speech_tokenizer"
    codec = Qwen3TTSTokenizerV2Model(Qwen3TTSTokenizerV2Config(**shapes.speech_tokenizer_config(shape)))
    randomize_(codec, seed + 1)
    codec.save_pretrained(st_dir, safe_serialization=True)  # fp32, like the released tokenizer
    del codec
    _write_json(st_dir / "config.json", _released_config(shapes.speech_tokenizer_config(shape), "float32"))
    _write_json(st_dir / "preprocessor_config.json", dict(shapes.SPEECH_TOKENIZER_PREPROCESSOR))
    _write_json(
        out_dir / "random_checkpoint.json",
        {"shape": shape, "variant": variant, "seed": seed, "recipe_version": RECIPE_VERSION,
         "note": "random weights: this checkpoint produces noise, not speech"},
    )
    return out_dir


def cached_random_checkpoint(shape: str, variant: str, seed: int = 0) -> Path:
    """Return the cached random checkpoint, building it once (atomically) when missing."""
    shapes.model_config(shape, variant)  # validates shape/variant with a clear message
    # A plain identifier as folder name: transformers derives module names from it and warns otherwise.
    name = f"{shape.replace('.', '_')}_{variant}_seed{seed}"
    final = cache_root() / "random" / f"v{RECIPE_VERSION}" / name
    if (final / "random_checkpoint.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        build_random_checkpoint(shape, variant, seed, tmp / "ckpt")
        try:
            os.replace(tmp / "ckpt", final)
        except OSError:
            if not (final / "random_checkpoint.json").is_file():  # not a concurrent builder's win
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
