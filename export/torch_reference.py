"""The official PyTorch modules behind the runtime's backend protocols: the parity and speed reference.

Wrapping the official talker and code predictor in the engine contract (``runtime/engine/contract.py``) that
the runtime's engines (llama.cpp, ONNX Runtime) implement lets one frame loop run on all of them, so tests can
check our loop, prompt and sampler against the official ``generate`` and then swap in the exported engines;
bench uses the same wrappers as its PyTorch baseline. This is the one place that loads the official model
(whole, or the talker alone) and computes its text / codec / residual embeddings, so export checks, bench
parity and tests all compare against the same reference. Export side only (torch).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..runtime.engine.contract import Placement, StepOutput
from ..runtime.sampler import GREEDY, ResidualSampling
from .official import qwen_tts


def load_official(path, dtype: str = "float32"):
    """The official ``Qwen3TTSForConditionalGeneration`` (with speech tokenizer) from a checkpoint folder."""
    import torch

    wrapper = qwen_tts().Qwen3TTSModel.from_pretrained(str(path), dtype=getattr(torch, dtype),
                                                       attn_implementation="eager")
    return wrapper.model.eval()


def checkpoint_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    return (sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()})
            if index.is_file() else [folder / "model.safetensors"])


def _load_part(module: Any, folder: Path, prefix: str) -> Any:
    """Copy the checkpoint tensors under ``prefix`` into ``module`` one by one; fp32, eval, no grad.

    Tensor by tensor: a full state dict would double peak memory (1.7B: 2 x 7.7 GB).
    """
    from safetensors import safe_open

    own = dict(module.named_parameters())
    own.update(module.named_buffers())
    seen = set()
    for path in checkpoint_files(folder):
        with safe_open(str(path), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 - safe_open is not a dict
                if not k.startswith(prefix):
                    continue
                name = k[len(prefix):]
                if name not in own:
                    raise KeyError(f"unexpected checkpoint tensor {k}")
                own[name].data.copy_(f.get_tensor(k))
                seen.add(name)
    missing = set(dict(module.named_parameters())) - seen
    if missing:
        raise KeyError(f"checkpoint lacks {prefix}* tensors {sorted(missing)[:5]}")
    for prm in module.parameters():
        prm.requires_grad_(False)
    return module.float().eval()


def _config(folder: Path) -> tuple[Any, dict[str, Any]]:
    qwen_tts()
    from qwen_tts.core.models.configuration_qwen3_tts import Qwen3TTSConfig

    cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    return Qwen3TTSConfig(**cfg), cfg


def load_official_talker(checkpoint_dir: Path) -> tuple[Any, dict[str, Any]]:
    """The official talker module in fp32 (eval) and the checkpoint's config, from the ``talker.*`` tensors only.

    Lighter than :func:`load_official` (no speech tokenizer, no full-model copy) for checks of the talker and
    code predictor alone.
    """
    qwen_tts()  # imports qwen_tts the supported way first (its torchaudio stub), so the import below works
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSTalkerForConditionalGeneration

    config, cfg = _config(Path(checkpoint_dir))
    return _load_part(Qwen3TTSTalkerForConditionalGeneration(config.talker_config), Path(checkpoint_dir),
                      "talker."), cfg


def load_official_speaker_encoder(checkpoint_dir: Path) -> Any:
    """The official speaker encoder (ECAPA-TDNN) of a Base checkpoint in fp32, from ``speaker_encoder.*`` only."""
    from qwen_tts.core.models.modeling_qwen3_tts import Qwen3TTSSpeakerEncoder

    config, cfg = _config(Path(checkpoint_dir))
    if cfg.get("tts_model_type") != "base":
        raise ValueError(f"{checkpoint_dir} is a {cfg.get('tts_model_type')} checkpoint; only Base models have a "
                         "speaker encoder")
    return _load_part(Qwen3TTSSpeakerEncoder(config.speaker_encoder_config), Path(checkpoint_dir),
                      "speaker_encoder.")


def official_text_embeds(talker: Any, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Projected text-track vectors P(x) of ``ids``, (n, H) float32."""
    import torch

    t = torch.as_tensor(np.asarray(ids, dtype=np.int64))
    with torch.no_grad():
        return talker.text_projection(talker.get_text_embeddings()(t)).float().numpy()


def official_codec_embeds(talker: Any, ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """Talker codec embedding rows E(c) of ``ids``, (n, H) float32."""
    import torch

    with torch.no_grad():
        return talker.get_input_embeddings()(torch.as_tensor(np.asarray(ids, dtype=np.int64))).float().numpy()


def official_residual_embeds(talker: Any, codes15: Sequence[int]) -> np.ndarray:
    """Sum of the 15 residual-codebook rows of one frame, (H,), added in codebook order from zero."""
    import torch

    tabs = talker.code_predictor.get_input_embeddings()
    out = torch.zeros(talker.config.hidden_size)
    with torch.no_grad():
        for j, c in enumerate(codes15):
            out += tabs[j](torch.tensor(int(c)))
    return out.numpy()


class TorchTables:
    """EmbeddingTables computed by the official modules (text projection, codec and residual embeddings)."""

    def __init__(self, model):
        self.talker = model.talker
        self.hidden_size = model.talker.config.hidden_size

    def text_embeds(self, ids) -> np.ndarray:
        return official_text_embeds(self.talker, ids)

    def codec_embeds(self, ids) -> np.ndarray:
        return official_codec_embeds(self.talker, ids)

    def frame_embeds(self, codes) -> np.ndarray:
        import torch

        codes = torch.as_tensor(np.asarray(codes, dtype=np.int64))
        tables = self.talker.code_predictor.get_input_embeddings()
        with torch.no_grad():
            out = self.talker.get_input_embeddings()(codes[:, 0])
            for j, table in enumerate(tables):
                out = out + table(codes[:, j + 1])
        return out.float().numpy()


REFERENCE_PLACEMENT = Placement("cpu", note="official PyTorch modules (parity reference)")


class TorchTalker:
    """The official talker backbone + codec head with a KV cache, one prompt at a time (no ``KV_STATE``)."""

    capabilities: frozenset[str] = frozenset()
    placement = REFERENCE_PLACEMENT

    def __init__(self, model):
        self.talker = model.talker
        self.hidden_size = model.talker.config.hidden_size
        self.reset()

    @property
    def n_past(self) -> int:
        return 0 if self.cache is None else int(self.cache.get_seq_length())

    @property
    def n_ctx(self) -> int | None:
        return None

    def reset(self) -> None:
        self.cache = None

    def _forward(self, embeds: np.ndarray) -> StepOutput:
        import torch
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache()
        x = torch.from_numpy(np.ascontiguousarray(embeds, dtype=np.float32))[None]
        with torch.no_grad():
            out = self.talker.model(inputs_embeds=x.to(self.talker.dtype), past_key_values=self.cache, use_cache=True)
            hidden = out.last_hidden_state[:, -1]
            logits = self.talker.codec_head(hidden)
        return StepOutput(logits=logits[0].float().numpy(), hidden=hidden[0].float().numpy())

    def prefill(self, embeds: np.ndarray) -> StepOutput:
        self.reset()
        return self._forward(embeds)

    def extend(self, embeds: np.ndarray) -> StepOutput:
        return self._forward(embeds)

    def step(self, embed: np.ndarray) -> StepOutput:
        return self._forward(np.asarray(embed)[None])


class TorchPredictor:
    """The official code predictor run step by step with a fresh cache per frame (as its generate does)."""

    capabilities: frozenset[str] = frozenset()
    placement = REFERENCE_PLACEMENT

    def __init__(self, model):
        self.talker = model.talker
        self.cp = model.talker.code_predictor

    def step_logits(self, inputs: np.ndarray, step: int, cache) -> np.ndarray:
        import torch

        x = torch.from_numpy(np.ascontiguousarray(inputs, dtype=np.float32))[None].to(self.cp.dtype)
        with torch.no_grad():
            h = self.cp.model(inputs_embeds=self.cp.small_to_mtp_projection(x), past_key_values=cache,
                              use_cache=True).last_hidden_state[:, -1]
            return self.cp.lm_head[step](h)[0].float().numpy()

    def predict(self, past_hidden: np.ndarray, c0: int, sampling: ResidualSampling = GREEDY) -> np.ndarray:
        import torch
        from transformers import DynamicCache

        cache = DynamicCache()
        with torch.no_grad():
            e0 = self.talker.get_input_embeddings()(torch.tensor([c0])).float().numpy()
        inputs = np.concatenate([np.asarray(past_hidden, dtype=np.float32)[None], e0])
        codes = []
        tables = self.cp.get_input_embeddings()
        for step in range(self.talker.config.num_code_groups - 1):
            code = sampling.choose(step, self.step_logits(inputs, step, cache))
            codes.append(code)
            with torch.no_grad():
                inputs = tables[step](torch.tensor([code])).float().numpy()
        return np.asarray(codes, dtype=np.int64)
