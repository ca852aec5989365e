"""The official PyTorch modules behind the runtime's backend protocols: the parity and speed reference.

Wrapping the official talker and code predictor in the same ``TalkerBackend`` / ``PredictorBackend``
interfaces as the llama.cpp engines lets one frame loop run on both, so tests can check our loop, prompt and
sampler against the official ``generate`` and then swap in the exported engines; bench uses the same
wrappers as its PyTorch baseline. Export side only (torch).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .official import qwen_tts


@dataclass(frozen=True)
class TorchStep:
    logits: np.ndarray
    hidden: np.ndarray


def load_official(path, dtype: str = "float32"):
    """The official ``Qwen3TTSForConditionalGeneration`` (with speech tokenizer) from a checkpoint folder."""
    import torch

    wrapper = qwen_tts().Qwen3TTSModel.from_pretrained(str(path), dtype=getattr(torch, dtype),
                                                       attn_implementation="eager")
    return wrapper.model.eval()


class TorchTables:
    """EmbeddingSource computed by the official modules (text projection, codec and residual embeddings)."""

    def __init__(self, model):
        self.talker = model.talker
        self.hidden_size = model.talker.config.hidden_size

    def _run(self, fn, ids) -> np.ndarray:
        import torch

        with torch.no_grad():
            return fn(torch.as_tensor(np.asarray(ids, dtype=np.int64))).float().numpy()

    def text_embeds(self, ids) -> np.ndarray:
        t = self.talker
        return self._run(lambda x: t.text_projection(t.get_text_embeddings()(x)), ids)

    def codec_embeds(self, ids) -> np.ndarray:
        return self._run(self.talker.get_input_embeddings(), ids)

    def frame_embeds(self, codes) -> np.ndarray:
        import torch

        codes = torch.as_tensor(np.asarray(codes, dtype=np.int64))
        tables = self.talker.code_predictor.get_input_embeddings()
        with torch.no_grad():
            out = self.talker.get_input_embeddings()(codes[:, 0])
            for j, table in enumerate(tables):
                out = out + table(codes[:, j + 1])
        return out.float().numpy()


class TorchTalker:
    """The official talker backbone + codec head with a KV cache, one prompt at a time."""

    def __init__(self, model):
        self.talker = model.talker
        self.reset()

    def reset(self) -> None:
        self.cache = None

    def _forward(self, embeds: np.ndarray) -> TorchStep:
        import torch
        from transformers import DynamicCache

        if self.cache is None:
            self.cache = DynamicCache()
        x = torch.from_numpy(np.ascontiguousarray(embeds, dtype=np.float32))[None]
        with torch.no_grad():
            out = self.talker.model(inputs_embeds=x.to(self.talker.dtype), past_key_values=self.cache, use_cache=True)
            hidden = out.last_hidden_state[:, -1]
            logits = self.talker.codec_head(hidden)
        return TorchStep(logits=logits[0].float().numpy(), hidden=hidden[0].float().numpy())

    def prefill(self, embeds: np.ndarray) -> TorchStep:
        self.reset()
        return self._forward(embeds)

    def step(self, embed: np.ndarray) -> TorchStep:
        return self._forward(np.asarray(embed)[None])


class TorchPredictor:
    """The official code predictor run step by step with a fresh cache per frame (as its generate does)."""

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

    def predict(self, past_hidden: np.ndarray, c0: int, choose: Callable[[int, np.ndarray], int]) -> np.ndarray:
        import torch
        from transformers import DynamicCache

        cache = DynamicCache()
        with torch.no_grad():
            e0 = self.talker.get_input_embeddings()(torch.tensor([c0])).float().numpy()
        inputs = np.concatenate([np.asarray(past_hidden, dtype=np.float32)[None], e0])
        codes = []
        tables = self.cp.get_input_embeddings()
        for step in range(self.talker.config.num_code_groups - 1):
            code = int(choose(step, self.step_logits(inputs, step, cache)))
            codes.append(code)
            with torch.no_grad():
                inputs = tables[step](torch.tensor([code])).float().numpy()
        return np.asarray(codes, dtype=np.int64)
