"""Parity and speed of the llama.cpp talker/predictor engines against the official PyTorch model.

A teacher-forced trajectory (a CustomVoice-style prompt, then frames of fixed random codes) is fed to the
official ``talker.model`` + ``codec_head`` and to the llama.cpp ``Talker``; per frame, the official code
predictor (``forward_finetune`` on [past_hidden, E(c0), table_j(c_{j+1})...]) and the llama.cpp
``CodePredictor`` (with a chooser that returns the forced codes) get the same talker hidden state. Metrics
per position, then averaged: logit cosine, KL(ref || test) of the softmax, top-1 agreement (numpy only).
Needs the export extras (torch, qwen-tts) for the reference side, which comes from
:mod:`~qwen3_tts_edge.export.torch_reference` (loading and embeddings of the official model).

Files are found by the bundle naming convention in a folder: ``talker.P.gguf``, ``predictor.P.gguf``,
``predictor_tables.P.gguf``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..export.torch_reference import (
    load_official_talker,
    official_codec_embeds,
    official_residual_embeds,
    official_text_embeds,
)
from ..quant.metrics import logit_metrics
from ..runtime.sampler import ResidualSampling

# ----------------------------------------------------------------------------------------------------------
# the official reference


@dataclass
class Reference:
    """Official PyTorch talker (fp32) and the teacher-forced trajectory computed with it."""

    talker: Any  # Qwen3TTSTalkerForConditionalGeneration
    config: dict[str, Any]
    embeds: np.ndarray  # (T, H) every talker input
    n_prompt: int
    logits: np.ndarray  # (T, vocab) codec logits at every position
    hidden: np.ndarray  # (T, H) final-normed hidden states
    frames: np.ndarray  # (n_frames, 16) the forced codes of each generated frame
    pred_logits: np.ndarray  # (n_frames, 15, codebook) official predictor logits per frame


def prompt_ids(cfg: dict[str, Any], n_text: int = 8, seed: int = 0) -> tuple[list[int], list[int | None]]:
    """A non-streaming CustomVoice-style prompt: (text ids, codec ids or None) per position."""
    tc = cfg["talker_config"]
    rng = np.random.default_rng(seed)
    pad, bos, eos = cfg["tts_pad_token_id"], cfg["tts_bos_token_id"], cfg["tts_eos_token_id"]
    role = [cfg["im_start_token_id"], cfg.get("assistant_token_id", 77091), 198]
    langs = tc.get("codec_language_id") or {}
    lang = langs.get("english", next(iter(langs.values()), tc["codec_nothink_id"]))
    speakers = tc.get("spk_id") or {}
    codec = [tc["codec_think_id"], tc["codec_think_bos_id"], lang, tc["codec_think_eos_id"]]
    if speakers:
        spk = next(iter(speakers.values()))
        codec.append(int(spk[0] if isinstance(spk, list) else spk))
    content = [int(x) for x in rng.integers(1000, 100000, size=n_text)]
    text: list[int] = role + [pad] * len(codec) + [bos] + content + [eos] + [pad]
    codes: list[int | None] = [None] * 3 + codec + [tc["codec_pad_id"]] * (1 + n_text + 1) + [tc["codec_bos_id"]]
    return text, codes


def build_reference(checkpoint_dir: Path, *, n_text: int = 8, n_frames: int = 24, n_pred_frames: int = 6,
                    seed: int = 0, talker: Any = None) -> Reference:
    """Run the official model along a teacher-forced trajectory (prompt + ``n_frames`` frames)."""
    import torch

    if talker is None:
        talker, cfg = load_official_talker(checkpoint_dir)
    else:
        cfg = json.loads((Path(checkpoint_dir) / "config.json").read_text(encoding="utf-8"))
    tc = cfg["talker_config"]
    text, codec = prompt_ids(cfg, n_text, seed)
    x = official_text_embeds(talker, text)
    for i, c in enumerate(codec):
        if c is not None:
            x[i] += official_codec_embeds(talker, [c])[0]
    n_groups = int(tc["num_code_groups"])
    cb = int(tc["code_predictor_config"]["vocab_size"])
    rng = np.random.default_rng(seed + 1)
    frames = rng.integers(0, cb, size=(n_frames, n_groups))
    pad = official_text_embeds(talker, [cfg["tts_pad_token_id"]])[0]
    steps = [official_codec_embeds(talker, [f[0]])[0] + official_residual_embeds(talker, f[1:]) + pad
             for f in frames]
    embeds = np.concatenate([x, np.stack(steps)]).astype(np.float32)
    with torch.no_grad():
        return _reference_forward(talker, cfg, embeds, x.shape[0], frames, n_pred_frames)


def _reference_forward(talker: Any, cfg: dict[str, Any], embeds: np.ndarray, n_prompt: int, frames: np.ndarray,
                       n_pred_frames: int) -> Reference:
    import torch

    n_groups = frames.shape[1]
    out = talker.model(inputs_embeds=torch.from_numpy(embeds)[None])
    hidden = out.last_hidden_state[0]
    logits = talker.codec_head(hidden).numpy()
    hidden = hidden.numpy()
    # Frame k's c0 is produced at position n_prompt - 1 + k; its predictor input is that hidden state.
    tabs = talker.code_predictor.get_input_embeddings()
    pred = []
    for k in range(min(n_pred_frames, frames.shape[0])):
        f = torch.as_tensor(frames[k])
        seq = [torch.from_numpy(hidden[n_prompt - 1 + k]), talker.model.codec_embedding(f[0])]
        seq += [tabs[j](f[j + 1]) for j in range(n_groups - 2)]
        res = talker.code_predictor.forward_finetune(inputs_embeds=torch.stack(seq)[None])
        pred.append(res.logits[0].numpy())
    return Reference(talker=talker, config=cfg, embeds=embeds, n_prompt=n_prompt, logits=logits, hidden=hidden,
                     frames=frames, pred_logits=np.stack(pred))


# ----------------------------------------------------------------------------------------------------------
# engines along the trajectory


def files_for(folder: Path, precision: str) -> tuple[Path, Path, Path]:
    folder = Path(folder)
    return (folder / f"talker.{precision}.gguf", folder / f"predictor.{precision}.gguf",
            folder / f"predictor_tables.{precision}.gguf")


def run_talker(ref: Reference, talker_path: Path, *, n_threads: int = 2, kv_type: str = "f32",
               flash_attn: bool | None = False, adapter: tuple[bytes, float] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
    """Engine logits/hidden at the last prompt position and every frame position: (1 + n_frames, ...);
    ``adapter``: a GGUF LoRA adapter (a voice pack's) and its scale, set for the whole run."""
    from ..runtime.backends.llama_cpp.talker import Talker

    with Talker(talker_path, n_ctx=ref.embeds.shape[0] + 8, n_threads=n_threads, kv_type=kv_type,
                flash_attn=flash_attn) as t:
        lora = None if adapter is None else t.load_adapter(adapter[0])  # referenced until the talker closes
        if lora is not None:
            t.set_adapters([(lora, adapter[1])])
        outs = [t.prefill(ref.embeds[: ref.n_prompt])]
        outs += [t.step(e) for e in ref.embeds[ref.n_prompt:]]
    return np.stack([o.logits for o in outs]), np.stack([o.hidden for o in outs])


def run_predictor(ref: Reference, model_path: Path, tables_path: Path, *, n_threads: int = 2,
                  kv_type: str = "f32", flash_attn: bool | None = False,
                  adapter: tuple[bytes, float] | None = None, heads: Any = None) -> np.ndarray:
    """Engine logits (n_pred_frames, 15, codebook) with the reference's forced codes (``adapter``: as
    ``run_talker``; ``heads``: quantised heads, ``runtime/backends/onnxruntime/heads.py``, else the float32 ones)."""
    from ..runtime.backends.llama_cpp.predictor import CodePredictor

    out = []
    with CodePredictor(model_path, tables_path, n_threads=n_threads, kv_type=kv_type, flash_attn=flash_attn,
                       heads=heads) as p:
        lora = None if adapter is None else p.load_adapter(adapter[0])  # referenced until the predictor closes
        if lora is not None:
            p.set_adapters([(lora, adapter[1])])
        for k in range(ref.pred_logits.shape[0]):
            forced = ref.frames[k]
            got: list[np.ndarray] = []

            def choose(j: int, logits: np.ndarray, forced: np.ndarray = forced, got: list = got) -> int:
                got.append(logits.copy())
                return int(forced[j + 1])

            p.predict(ref.hidden[ref.n_prompt - 1 + k], int(forced[0]), ResidualSampling.host(choose))
            out.append(np.stack(got))
    return np.stack(out)


def parity(checkpoint_dir: Path, folder: Path, precisions: Sequence[str], *, n_frames: int = 24,
           n_pred_frames: int = 6, seed: int = 0, n_threads: int = 2, ref: Reference | None = None,
           heads: Any = None) -> dict[str, dict[str, dict[str, float]]]:
    """Per precision: ``{"talker": {logit_cos, kl, top1, ...}, "predictor": {...}}`` against the official model
    (``heads``: the predictor's quantised heads, ``run_predictor``: each precision P also gets a row ``P+int8``
    whose predictor figures are measured with them).

    Engines run with an F32 KV cache and flash attention off for f32 (strict parity); quantized precisions use
    the runtime defaults (F16 KV), i.e. what a user gets.
    """
    ref = ref or build_reference(checkpoint_dir, n_frames=n_frames, n_pred_frames=n_pred_frames, seed=seed)
    ref_talker = ref.logits[ref.n_prompt - 1:]
    report: dict[str, dict[str, dict[str, float]]] = {}
    for p in precisions:
        talker_path, pred_path, tab_path = files_for(folder, p)
        strict = p == "f32"
        kw: dict[str, Any] = {"n_threads": n_threads, "kv_type": "f32" if strict else "f16",
                              "flash_attn": False if strict else None}
        logits, hidden = run_talker(ref, talker_path, **kw)
        t = logit_metrics(ref_talker, logits)
        t["hidden_max_abs"] = float(np.max(np.abs(hidden - ref.hidden[ref.n_prompt - 1:])))
        pl = run_predictor(ref, pred_path, tab_path, **kw)
        pr = logit_metrics(ref.pred_logits.reshape(-1, ref.pred_logits.shape[-1]), pl.reshape(-1, pl.shape[-1]))
        report[p] = {"talker": t, "predictor": pr}
        if heads is not None:
            pl = run_predictor(ref, pred_path, tab_path, **kw, heads=heads)
            ph = logit_metrics(ref.pred_logits.reshape(-1, ref.pred_logits.shape[-1]), pl.reshape(-1, pl.shape[-1]))
            report[f"{p}+{heads.precision}"] = {"talker": t, "predictor": ph}
    return report


# ----------------------------------------------------------------------------------------------------------
# speed


def speed(folder: Path, precisions: Sequence[str], *, n_threads: int = 2, n_prompt: int = 32, n_steps: int = 32,
          n_frames: int = 16, seed: int = 0) -> dict[str, dict[str, float]]:
    """Talker ms/step and predictor ms/frame (15 calls) per precision with random inputs (engines only).

    Medians over steps/frames after a warm-up (the first calls page the mmapped weights in); the machine's
    other load shows up as outliers, which the median ignores.
    """
    from ..runtime.backends.llama_cpp.predictor import CodePredictor
    from ..runtime.backends.llama_cpp.talker import Talker

    rng = np.random.default_rng(seed)
    out: dict[str, dict[str, float]] = {}
    for p in precisions:
        talker_path, pred_path, tab_path = files_for(folder, p)
        with Talker(talker_path, n_ctx=n_prompt + n_steps + 16, n_threads=n_threads) as t:
            x = t.text_embeds(rng.integers(0, 100000, size=n_prompt + n_steps + 4))
            t.prefill(x[:n_prompt])  # warm-up (pages the weights in)
            t0 = time.perf_counter()
            t.prefill(x[:n_prompt])
            t_prefill = time.perf_counter() - t0
            for e in x[n_prompt:n_prompt + 4]:
                t.step(e)
            steps = []
            for e in x[n_prompt + 4:]:
                t0 = time.perf_counter()
                o = t.step(e)
                steps.append(time.perf_counter() - t0)
            hidden = o.hidden
        with CodePredictor(pred_path, tab_path, n_threads=n_threads) as pr:
            for _ in range(2):
                pr.predict(hidden, 1)  # warm-up
            frames, dec, head = [], [], []
            for _ in range(n_frames):
                pr.reset_counters()
                pr.predict(hidden, int(rng.integers(0, 2048)))
                frames.append(pr.total_s)
                dec.append(pr.decode_s)
                head.append(pr.head_s)
        out[p] = {"talker_prefill_ms": 1e3 * t_prefill, "talker_prefill_positions": n_prompt,
                  "talker_ms_per_step": 1e3 * float(np.median(steps)),
                  "talker_ms_per_step_mean": 1e3 * float(np.mean(steps)),
                  "predictor_ms_per_frame": 1e3 * float(np.median(frames)),
                  "predictor_ms_per_frame_mean": 1e3 * float(np.mean(frames)),
                  "predictor_decode_ms_per_frame": 1e3 * float(np.median(dec)),
                  "predictor_head_ms_per_frame": 1e3 * float(np.median(head))}
    return out


def torch_speed(checkpoint_dir: Path, *, n_threads: int = 2, n_prompt: int = 32, n_steps: int = 16,
                n_frames: int = 8, talker: Any = None) -> dict[str, float]:
    """Official fp32 PyTorch reference: talker step with KV cache (ms) and code-predictor generate per frame."""
    import torch

    torch.set_num_threads(n_threads)
    with torch.no_grad():
        return _torch_speed(checkpoint_dir, n_prompt, n_steps, n_frames, talker)


def _torch_speed(checkpoint_dir: Path, n_prompt: int, n_steps: int, n_frames: int, talker: Any) -> dict[str, float]:
    import torch
    from transformers import DynamicCache

    if talker is None:
        talker, _ = load_official_talker(checkpoint_dir)
    h = talker.config.hidden_size
    x = torch.randn(1, n_prompt + n_steps, h) * 0.1
    cache = DynamicCache()
    out = talker.model(inputs_embeds=x[:, :n_prompt], past_key_values=cache, use_cache=True)
    talker.codec_head(out.last_hidden_state[:, -1:])
    times = []
    for i in range(n_prompt, n_prompt + n_steps):
        t0 = time.perf_counter()
        out = talker.model(inputs_embeds=x[:, i:i + 1], past_key_values=out.past_key_values, use_cache=True,
                           cache_position=torch.tensor([i]))
        talker.codec_head(out.last_hidden_state[:, -1:])
        times.append(time.perf_counter() - t0)
    step = float(np.median(times[1:]))
    hid = out.last_hidden_state[:, -1:]
    e0 = talker.model.codec_embedding(torch.tensor([[5]]))
    ptimes = []
    for _ in range(n_frames):
        t0 = time.perf_counter()
        talker.code_predictor.generate(inputs_embeds=torch.cat([hid, e0], dim=1), max_new_tokens=15,
                                       do_sample=False, output_hidden_states=True, return_dict_in_generate=True)
        ptimes.append(time.perf_counter() - t0)
    return {"talker_ms_per_step": 1e3 * step, "predictor_ms_per_frame": 1e3 * float(np.median(ptimes[1:]))}
