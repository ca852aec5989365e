"""Code predictor → ONE fused ONNX graph per frame: 15 dependent steps, their KV cache and the sampling inside.

The official predictor runs 15 sequential calls per frame (187.5 per audio second), so per-call overhead is a
first-order cost; unrolling the frame into one graph leaves one ``session.run`` per frame. The graph is built
from the official modules (decoder layers, rotary embedding, norm, ``small_to_mtp_projection``, the 15 input
tables and heads, the talker's codec embedding for c0); the per-step KV cache lives inside the unrolled graph
(``ExplicitCache`` of ``talker_onnx``). Step 0 is the 2-position prefill [past_hidden, E(c0)]; step j feeds
``codec_embedding[j-1](c_j)`` and uses ``lm_head[j]``.

Sampling in the graph reproduces ``runtime/sampler.py`` (``process_residual`` + ``_draw``) step for step:
scores = logits / temperature (f32); top-k keeps scores >= the k-th largest (k 0 or >= vocab disables it);
top-p as ``_top_k_top_p`` (softmax over the ascending sort in f32, drop where the cumulative sum <= 1 - top_p,
always keep the largest; 1.0 disables it); then the inverse-CDF draw in f64 and index order: cdf = running sum
of exp(score - max) (masked ids add exactly 0), code = the first id with cdf > u * cdf[-1] (numpy
``searchsorted(side="right")`` over the kept ids), the last kept id if none. Greedy (``do_sample`` false) is
the argmax of the raw logits. ``uniforms`` and ``top_p`` are float64 because the sampler's are: with float32
the draw would differ near CDF boundaries. Sums may be reduced in another order than numpy's, so a code can
differ only where a threshold falls within rounding of a boundary.

Graph I/O (format 2; one row per frame, B frames of B streams at once): ``past_hidden`` (B, H) f32, ``c0`` (B,)
int64, ``uniforms`` (B, 15) f64, ``temperature`` (B,) f32, ``top_k`` (B,) int64, ``top_p`` (B,) f64,
``do_sample`` (B,) bool, ``forced`` (B, 15) int64 and ``n_forced`` (B,) int64 (the first ``n_forced`` codes of a
row are taken from ``forced``: teacher forcing, for parity checks and for choosers the graph cannot run).
Outputs: ``codes`` (B, 15) int64 and ``logits`` (B, 15, vocab) f32, the raw head logits. Every row has the same
length at every step (a frame always starts empty), so rows need no padding. Format 1 graphs take one frame,
with scalars in place of the (B,) inputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ..quant import gates
from ..runtime.sampler import ResidualSampling
from .talker_onnx import OPSET, ExplicitCache, causal_mask, eager_attention, export_graph, official_talker

PREDICTOR_FILE = "predictor.fp32.onnx"
INPUTS = ("past_hidden", "c0", "uniforms", "temperature", "top_k", "top_p", "do_sample", "forced", "n_forced")


def sample_codes(logits: Any, u: Any, temperature: Any, top_k: Any, top_p: Any, do_sample: Any) -> Any:
    """One residual code per row from (B, vocab) logits, as ``CodeSampler.choose_residual`` picks it (torch,
    traceable); every other argument has one value per row."""
    import torch

    vocab = logits.shape[-1]
    neg_inf = torch.tensor(float("-inf"), dtype=logits.dtype)
    ids = torch.arange(vocab)[None]
    scores = logits / temperature[:, None]
    # One ascending sort serves both filters (ONNX TopK orders ties by index, like numpy's stable argsort).
    asc, order = torch.sort(scores, dim=-1)
    # top-k: scores below the k-th largest go (np.partition(scores, -k)[-k] in the sampler)
    k = torch.where((top_k > 0) & (top_k < vocab), top_k, torch.full_like(top_k, vocab))
    kth = asc.gather(1, (vocab - k)[:, None])
    scores = torch.where(scores < kth, neg_inf, scores)
    asc = torch.where(asc < kth, neg_inf, asc)  # still the sampler's ascending order: masked entries weigh 0
    # top-p over that order, in float32 like the sampler; the last (largest) entry is always kept
    e = torch.exp(asc - asc.max(dim=-1, keepdim=True).values)
    cum = torch.cumsum(e / e.sum(dim=-1, keepdim=True), -1)
    keep_last = ids < vocab - 1
    remove = (cum <= (1.0 - top_p).to(logits.dtype)[:, None]) & keep_last & (top_p < 1.0)[:, None]
    removed = torch.zeros_like(remove).scatter(1, order, remove)
    scores = torch.where(removed, neg_inf, scores)
    # inverse-CDF draw in float64, index order: the first id whose running sum of exp(score - max) exceeds
    # u x the total; masked ids add exactly 0, so this is the sampler's sum over the kept ids alone
    kept = scores > neg_inf
    s = scores.double()
    cdf = torch.cumsum(torch.exp(s - s.max(dim=-1, keepdim=True).values), -1)
    first = (cdf <= u[:, None] * cdf[:, -1:]).to(torch.int64).sum(-1)
    last_kept = (ids * kept.to(torch.int64)).max(dim=-1).values
    drawn = torch.where(first < vocab, first, last_kept)
    return torch.where(do_sample, drawn, torch.argmax(logits, dim=-1))


def _predictor_graph(talker: Any) -> Any:
    import torch

    cp = talker.code_predictor

    class PredictorGraph(torch.nn.Module):
        """15 unrolled official predictor steps with in-graph KV cache and sampling (module docstring)."""

        def __init__(self) -> None:
            super().__init__()
            self.c0_table = talker.model.codec_embedding
            self.proj = cp.small_to_mtp_projection
            self.layers = cp.model.layers
            self.rotary = cp.model.rotary_emb
            self.norm = cp.model.norm
            self.tables = cp.model.codec_embedding
            self.heads = cp.lm_head

        def forward(self, past_hidden, c0, uniforms, temperature, top_k, top_p, do_sample, forced, n_forced):
            x = self.proj(torch.stack([past_hidden, self.c0_table(c0)], dim=1))  # (B, 2, H)
            cache = ExplicitCache([None] * (2 * len(self.layers)))
            codes, logits, pos = [], [], 0
            for j, head in enumerate(self.heads):
                t = x.shape[1]
                position_ids = torch.arange(pos, pos + t)[None]
                rope = self.rotary(x, position_ids)
                mask = causal_mask(t, pos, x.dtype) if t > 1 else None
                h = x
                for layer in self.layers:
                    h = layer(h, attention_mask=mask, position_ids=position_ids, past_key_values=cache,
                              use_cache=True, position_embeddings=rope)[0]
                cache.advance()
                pos += t
                step_logits = head(self.norm(h[:, -1]))  # (B, vocab)
                code = sample_codes(step_logits, uniforms[:, j], temperature, top_k, top_p, do_sample)
                code = torch.where(n_forced > j, forced[:, j], code)
                codes.append(code)
                logits.append(step_logits)
                if j + 1 < len(self.heads):
                    x = self.proj(self.tables[j](code[:, None]))
            return torch.stack(codes, dim=1), torch.stack(logits, dim=1)

    return PredictorGraph().eval()


def predictor_meta(talker: Any) -> dict[str, Any]:
    import torch

    cp = talker.code_predictor
    return {"graph": "predictor", "num_steps": len(cp.lm_head), "codebook_size": int(cp.config.vocab_size),
            "hidden_size": int(talker.config.hidden_size), "predictor_hidden_size": int(cp.config.hidden_size),
            "num_layers": int(cp.config.num_hidden_layers), "codec_vocab_size": int(talker.config.vocab_size),
            "has_projection": isinstance(cp.small_to_mtp_projection, torch.nn.Linear), "batch_axis": True}


def example_inputs(hidden_size: int, num_steps: int, rows: int = 2) -> tuple[Any, ...]:
    import torch

    b = rows
    return (torch.zeros(b, hidden_size), torch.zeros(b, dtype=torch.int64),
            torch.full((b, num_steps), 0.5, dtype=torch.float64), torch.full((b,), 0.9),
            torch.full((b,), 50), torch.full((b,), 0.8, dtype=torch.float64), torch.ones(b, dtype=torch.bool),
            torch.zeros(b, num_steps, dtype=torch.int64), torch.zeros(b, dtype=torch.int64))


def export_predictor_onnx(model_or_checkpoint_dir: Any, out_path: Path | str, *, opset: int = OPSET,
                          check: bool = True, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write the fused predictor graph to ``out_path``; return its manifest entry (role ``predictor``, onnx).

    With ``check`` the graph's greedy codes and raw logits are compared with the official predictor for a few
    frames (``fidelity``); differing codes or a miss of its ``quant.gates`` row raise RuntimeError.
    """
    import torch

    say = progress or (lambda _msg: None)
    t0 = time.perf_counter()
    talker = official_talker(model_or_checkpoint_dir)
    meta = predictor_meta(talker)
    out_path = Path(out_path)
    say(f"predictor: exporting the fused fp32 ONNX graph ({meta['num_steps']} steps x {meta['num_layers']} layers)")
    with torch.no_grad(), eager_attention(talker.code_predictor.config):
        files = export_graph(_predictor_graph(talker), example_inputs(meta["hidden_size"], meta["num_steps"]),
                             out_path, meta, "Qwen3-TTS code predictor: 15 steps fused, in-graph sampling, fp32",
                             opset_version=opset, input_names=list(INPUTS), output_names=["codes", "logits"],
                             dynamic_axes={n: {0: "B"} for n in (*INPUTS, "codes", "logits")})
    entry: dict[str, Any] = {"role": "predictor", "file": out_path.name, "format": "onnx", "precision": "fp32",
                             "meta": dict(meta, files=files), "fidelity": {}}
    if check:
        f = entry["fidelity"] = check_predictor(out_path, talker)
        failures = gates.gate("predictor", "fp32").failures(f, speed=False)
        if f["codes_equal"] != f["frames"]:
            failures.append(f"greedy codes equal on {f['codes_equal']} of {f['frames']} frames")
        if failures:
            raise RuntimeError(f"predictor ONNX does not match the official module: {'; '.join(failures)} ({f})")
        say(f"predictor: fp32 ok, greedy codes equal on {f['frames']} frames, logit cosine "
            f"{f['logit_cos_min']:.7f}")
    say(f"predictor: done ({time.perf_counter() - t0:.0f} s)")
    return entry


def official_greedy_frame(talker: Any, past_hidden: np.ndarray, c0: int) -> tuple[np.ndarray, np.ndarray]:
    """The official predictor's greedy codes (15,) and raw logits (15, vocab) of one frame.

    Step by step with a ``DynamicCache`` as ``TorchPredictor`` does (whose greedy codes equal the official
    ``generate``), keeping each step's raw head logits.
    """
    from .torch_reference import TorchPredictor

    class _Model:  # TorchPredictor wraps a full model; it only reads .talker
        pass

    model = _Model()
    model.talker = talker
    logits: list[np.ndarray] = []

    def choose(_step: int, lg: np.ndarray) -> int:
        logits.append(np.array(lg, dtype=np.float32))
        return int(np.argmax(lg))

    with eager_attention(talker.code_predictor.config):
        codes = TorchPredictor(model).predict(past_hidden, c0, ResidualSampling.host(choose))
    return codes, np.stack(logits)


def check_predictor(path: Path, talker: Any, *, frames: int = 4, seed: int = 0) -> dict[str, Any]:
    """Greedy codes and raw logits of the ORT graph vs the official predictor on random hidden states / c0."""
    from ..runtime.backends.onnxruntime.generation import OnnxPredictor

    rng = np.random.default_rng(seed)
    eng = OnnxPredictor(path, threads=1)
    equal, cos_min = 0, 1.0
    for _ in range(frames):
        hidden = rng.standard_normal(talker.config.hidden_size).astype(np.float32)
        c0 = int(rng.integers(0, talker.code_predictor.config.vocab_size))
        want_codes, want_logits = official_greedy_frame(talker, hidden, c0)
        codes, logits = eng.run(hidden, c0)
        equal += int(np.array_equal(codes, want_codes))
        cos = np.sum(logits * want_logits, -1) / (np.linalg.norm(logits, axis=-1) *
                                                  np.linalg.norm(want_logits, axis=-1))
        cos_min = min(cos_min, float(cos.min()))
    return {"frames": frames, "codes_equal": equal, "logit_cos_min": cos_min,
            "reference": "official code predictor step by step (torch fp32), greedy"}
