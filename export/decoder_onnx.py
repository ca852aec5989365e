"""Qwen3-TTS-Tokenizer-12Hz decoder → stateful streaming ONNX (fp32 / fp16 / int8).

The 12 Hz decoder is fully causal with zero lookahead (architecture reference §7.3), so a decoder that
carries the right state decodes any chunking of a code sequence to exactly the samples of one offline
forward. ``StatefulDecoder`` wraps the official module and threads that state explicitly
(§7.5 inventory): the 71 most recent post-RoPE K/V positions per layer (72-frame sliding window), the
left context of every causal convolution, one input sample of overlap for every transposed convolution
whose kernel is longer than its stride, and the absolute RoPE position. Every state tensor has a fixed
shape and the graph has no shape-dependent branches, so one graph serves every chunk size N ≥ 1 and the
first call works from the all-zero state (missing past positions are masked by the position counter).

The fp16 and int8 variants are derived from the fp32 graph following ``quant.policies`` and must pass
``quant.gates`` against the fp32 decode of the same codes before they are returned.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..quant import gates, policies
from ..quant import metrics as fidelity
from ..runtime.bundle import DECODER_METADATA_KEY, DECODER_PRECISIONS
from .official import qwen_tts

METADATA_KEY = DECODER_METADATA_KEY
FORMAT_VERSION = 1
OPSET = 18
CODES_INPUT = "codes"
PCM_OUTPUT = "pcm"
STATE_FILE = "decoder.state.npz"
CALIBRATION_FILE = "decoder.calibration.npz"
DEFAULT_PRECISIONS = DECODER_PRECISIONS
CALIBRATION_CHUNK = 4  # frames per calibration call
OFFLINE_REFERENCE = "official offline forward of the whole sequence (torch fp32)"
FP32_REFERENCE = "fp32 streaming ONNX decode of the same codes"


@dataclass(frozen=True)
class StateSpec:
    """One state tensor: graph input ``in_<name>`` is returned updated as output ``out_<name>``."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # numpy dtype name

    @property
    def input(self) -> str:
        return f"in_{self.name}"

    @property
    def output(self) -> str:
        return f"out_{self.name}"


# --------------------------------------------------------------------------------------------------
# torch side: the stateful wrapper
# --------------------------------------------------------------------------------------------------


def _conv_context(conv: Any) -> int:
    """Left context (samples) of an official ``CausalConvNet``: (k-1)·d, stride is always 1 here."""
    if conv.stride != 1:
        raise ValueError("stateful export supports stride-1 causal convolutions only")
    return conv.kernel_size - 1


def _tconv_context(tconv: Any) -> int:
    """Input samples of overlap a ``CausalTransConvNet`` needs from the previous chunk."""
    k, s = tconv.conv.kernel_size[0], tconv.conv.stride[0]
    if tconv.left_pad != 0 or tconv.right_pad != k - s:
        raise ValueError("expected the right-trimmed causal transposed conv of qwen-tts >= 0.1.0")
    return math.ceil((k - s) / s)


_States = dict[str, torch.Tensor]


def _cat_state(x: torch.Tensor, name: str, states: _States, out: _States) -> torch.Tensor:
    """Prepend the carried samples and record the new carry (the last ``ctx`` samples)."""
    past = states[name]
    full = torch.cat([past, x], dim=-1)
    out[name] = full[..., -past.shape[-1] :]
    return full


class _Dequantize(nn.Module):
    """Split RVQ decode, exactly the official op order: [N, Q] codes → [1, codebook_dim, N]."""

    def __init__(self, quantizer: nn.Module) -> None:
        super().__init__()
        self.quantizer = quantizer

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        return self.quantizer.decode(codes.transpose(0, 1)[None])


class _Conv(nn.Module):
    """Official stride-1 causal conv whose zero left padding is replaced by the carried context."""

    def __init__(self, causal: nn.Module, state: str | None) -> None:
        super().__init__()
        self.conv = causal.conv
        self.state = state

    def forward(self, x: torch.Tensor, states: _States, out: _States) -> torch.Tensor:
        if self.state is not None:
            x = _cat_state(x, self.state, states, out)
        return self.conv(x)


class _TransConv(nn.Module):
    """Official causal transposed conv (right trim k - s) with the overlapping input samples carried.

    With ``polyphase`` (kernel a multiple of the stride, true for every decoder transposed conv) it is
    computed as an ordinary conv with s·C_out channels over [carry, x] followed by an interleave:
    output sample m·s + j = bias + Σ_i W[:, :, j + i·s] · x[m − i]. Same sums, but a plain Conv runs
    faster than onnxruntime's ConvTranspose (col2im) and is int8-quantisable as QLinearConv.
    """

    def __init__(self, causal: nn.Module, state: str | None, polyphase: bool = True) -> None:
        super().__init__()
        tconv = causal.conv
        self.state = state
        self.kernel, self.stride = tconv.kernel_size[0], tconv.stride[0]
        self.ctx = _tconv_context(causal)
        self.polyphase = polyphase and self.kernel % self.stride == 0
        if not self.polyphase:
            self.conv = tconv
            return
        c_in, c_out, s, taps = tconv.in_channels, tconv.out_channels, self.stride, self.ctx + 1
        w = tconv.weight.detach()  # [C_in, C_out, k]
        # Output channel j·C_out + o, tap p (p = taps-1 is the newest input sample).
        poly = w.reshape(c_in, c_out, taps, s).flip(2).permute(3, 1, 0, 2).reshape(s * c_out, c_in, taps)
        self.conv = nn.Conv1d(c_in, s * c_out, taps)
        self.conv.weight = nn.Parameter(poly.contiguous(), requires_grad=False)
        bias = tconv.bias.detach() if tconv.bias is not None else torch.zeros(c_out)
        self.conv.bias = nn.Parameter(bias.repeat(s), requires_grad=False)
        self.c_out = c_out

    def forward(self, x: torch.Tensor, states: _States, out: _States) -> torch.Tensor:
        if self.state is not None:
            x = _cat_state(x, self.state, states, out)
        y = self.conv(x)
        if self.polyphase:  # [1, s·C_out, L] → [1, C_out, L·s]
            n = y.shape[-1]
            y = y.view(1, self.stride, self.c_out, n).permute(0, 2, 3, 1)
            return y.reshape(1, self.c_out, n * self.stride)
        if self.state is None:  # kernel == stride: input samples do not overlap
            return y
        # Drop what the carried samples already emitted in earlier calls, and the tail that the next
        # call completes (the official forward trims k - s samples on the right).
        return y[..., self.ctx * self.stride : y.shape[-1] - (self.kernel - self.stride)]


class _ConvNeXt(nn.Module):
    def __init__(self, block: nn.Module, state: str) -> None:
        super().__init__()
        self.dwconv = _Conv(block.dwconv, state)
        self.norm, self.pwconv1, self.act, self.pwconv2 = block.norm, block.pwconv1, block.act, block.pwconv2
        self.gamma = block.gamma

    def forward(self, x: torch.Tensor, states: _States, out: _States) -> torch.Tensor:
        h = self.dwconv(x, states, out).permute(0, 2, 1)
        h = self.pwconv2(self.act(self.pwconv1(self.norm(h))))
        return x + (self.gamma * h).permute(0, 2, 1)


class _ResidualUnit(nn.Module):
    def __init__(self, unit: nn.Module, state: str) -> None:
        super().__init__()
        if _conv_context(unit.conv2) != 0:
            raise ValueError("residual unit conv2 is expected to be k=1")
        self.act1, self.act2 = unit.act1, unit.act2
        self.conv1, self.conv2 = _Conv(unit.conv1, state), unit.conv2.conv

    def forward(self, x: torch.Tensor, states: _States, out: _States) -> torch.Tensor:
        return x + self.conv2(self.act2(self.conv1(self.act1(x), states, out)))


class _Block(nn.Module):
    """SnakeBeta → causal transposed conv (×rate) → residual units (dilations 1, 3, 9)."""

    def __init__(self, block: nn.Module, prefix: str) -> None:
        super().__init__()
        self.snake = block.block[0]
        self.tconv = _TransConv(block.block[1], f"{prefix}_tconv")
        self.res = nn.ModuleList(_ResidualUnit(u, f"{prefix}_res{j}") for j, u in enumerate(block.block[2:]))

    def forward(self, x: torch.Tensor, states: _States, out: _States) -> torch.Tensor:
        x = self.tconv(self.snake(x), states, out)
        for unit in self.res:
            x = unit(x, states, out)
        return x


class _Transformer(nn.Module):
    """The official pre_transformer with a fixed-size sliding-window K/V cache and absolute positions.

    The official forward restarts positions at 0 on every call; the offline decode of a whole sequence
    numbers frames 0..T-1, so streaming continues the counter. Cache slots whose absolute position would
    be negative (the first 71 frames of a stream) are masked, so a zero cache is a valid initial state.
    """

    def __init__(self, tr: nn.Module, window: int) -> None:
        super().__init__()
        self.input_proj, self.output_proj = tr.input_proj, tr.output_proj
        self.layers, self.norm, self.rotary_emb = tr.layers, tr.norm, tr.rotary_emb
        self.window = window
        self.cache_len = window - 1
        attn = tr.layers[0].self_attn
        self.head_dim = attn.head_dim
        self.n_heads = attn.q_proj.out_features // attn.head_dim
        self.n_kv = attn.k_proj.out_features // attn.head_dim

    def forward(self, x: torch.Tensor, pos: torch.Tensor, kv: torch.Tensor, out: _States) -> torch.Tensor:
        from qwen_tts.core.tokenizer_12hz import modeling_qwen3_tts_tokenizer_v2 as official

        n = x.shape[1]
        h = self.input_proj(x)
        positions = pos + torch.arange(n, dtype=torch.int64)
        cos, sin = self.rotary_emb(h, positions[None, :])
        keys = torch.cat([pos - self.cache_len + torch.arange(self.cache_len, dtype=torch.int64), positions])
        delta = positions[:, None] - keys[None, :]
        allowed = (keys[None, :] >= 0) & (delta >= 0) & (delta < self.window)
        new_kv = []
        for i, layer in enumerate(self.layers):
            attn = layer.self_attn
            hn = layer.input_layernorm(h)
            q = attn.q_proj(hn).view(1, n, self.n_heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(hn).view(1, n, self.n_kv, self.head_dim).transpose(1, 2)
            v = attn.v_proj(hn).view(1, n, self.n_kv, self.head_dim).transpose(1, 2)
            q, k = official.apply_rotary_pos_emb(q, k, cos, sin)
            k = torch.cat([kv[i, 0][None], k], dim=2)
            v = torch.cat([kv[i, 1][None], v], dim=2)
            new_kv.append(torch.stack([k[0, :, -self.cache_len :], v[0, :, -self.cache_len :]]))
            k = official.repeat_kv(k, attn.num_key_value_groups)
            v = official.repeat_kv(v, attn.num_key_value_groups)
            scores = torch.matmul(q, k.transpose(2, 3)) * attn.scaling
            scores = torch.where(allowed, scores, torch.finfo(torch.float32).min)
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
            a = torch.matmul(probs, v).transpose(1, 2).reshape(1, n, -1)
            h = h + layer.self_attn_layer_scale(attn.o_proj(a))
            h = h + layer.mlp_layer_scale(layer.mlp(layer.post_attention_layernorm(h)))
        out["kv"] = torch.stack(new_kv)
        return self.output_proj(self.norm(h))


class StatefulDecoder(nn.Module):
    """(codes[N, Q] int64, *states) → (pcm[N·upsample] float32, *next_states) over an official decoder.

    Submodule paths (``dequant``, ``pre_conv``, ``transformer``, ``upsample.i``, ``in_conv``,
    ``blocks.i``, ``head_snake``, ``head_conv``) become the ONNX name scopes that ``quant.policies``
    matches when it decides which nodes stay fp32.
    """

    def __init__(self, dec: nn.Module) -> None:
        super().__init__()
        cfg = dec.config
        names = [type(m).__name__ for m in dec.decoder]
        expected_tail = ["SnakeBeta", "Qwen3TTSTokenizerV2CausalConvNet"]
        if names[0] != "Qwen3TTSTokenizerV2CausalConvNet" or names[-2:] != expected_tail:
            raise ValueError(f"unexpected decoder layout {names}")
        self.num_quantizers = int(cfg.num_quantizers)
        self.codebook_size = int(cfg.codebook_size)
        self.samples_per_frame = int(np.prod(list(cfg.upsample_rates) + list(cfg.upsampling_ratios)))
        self.window = int(cfg.sliding_window)
        self.dequant = _Dequantize(dec.quantizer)
        self.pre_conv = _Conv(dec.pre_conv, "pre_conv")
        self.transformer = _Transformer(dec.pre_transformer, self.window)
        self.upsample = nn.ModuleList()
        for i, (tconv, block) in enumerate(dec.upsample):
            t_state = f"upsample{i}_tconv" if _tconv_context(tconv) else None
            stage = [_TransConv(tconv, t_state), _ConvNeXt(block, f"upsample{i}_dwconv")]
            self.upsample.append(nn.ModuleList(stage))
        self.in_conv = _Conv(dec.decoder[0], "in_conv")
        self.blocks = nn.ModuleList(_Block(b, f"block{i}") for i, b in enumerate(dec.decoder[1:-2]))
        self.head_snake = dec.decoder[-2]
        self.head_conv = _Conv(dec.decoder[-1], "head_conv")
        self.specs = self._collect_specs()

    def _collect_specs(self) -> tuple[StateSpec, ...]:
        tr = self.transformer
        specs = [StateSpec("pos", (1,), "int64")]
        for module in self.modules():
            if isinstance(module, _Conv | _TransConv) and module.state is not None:
                conv = module.conv
                ctx = (module.ctx if isinstance(module, _TransConv)
                       else (conv.kernel_size[0] - 1) * conv.dilation[0])
                specs.append(StateSpec(module.state, (1, conv.in_channels, ctx), "float32"))
            elif module is tr:
                shape = (len(tr.layers), 2, tr.n_kv, tr.cache_len, tr.head_dim)  # post-RoPE K, V
                specs.append(StateSpec("kv", shape, "float32"))
        return tuple(specs)

    def forward(self, codes: torch.Tensor, *state: torch.Tensor) -> tuple[torch.Tensor, ...]:
        states = {spec.name: t for spec, t in zip(self.specs, state, strict=True)}
        out: dict[str, torch.Tensor] = {}
        pos = states["pos"]
        h = self.pre_conv(self.dequant(codes), states, out).transpose(1, 2)
        h = self.transformer(h, pos, states["kv"], out).permute(0, 2, 1)
        for tconv, block in self.upsample:
            h = block(tconv(h, states, out), states, out)
        h = self.in_conv(h, states, out)
        for block in self.blocks:
            h = block(h, states, out)
        h = self.head_conv(self.head_snake(h), states, out)
        out["pos"] = pos + codes.shape[0]
        return (h.clamp(min=-1, max=1).reshape(-1), *(out[spec.name] for spec in self.specs))

    def initial_state(self) -> list[torch.Tensor]:
        return [torch.zeros(s.shape, dtype=getattr(torch, s.dtype)) for s in self.specs]


# --------------------------------------------------------------------------------------------------
# loading, codes, reference decode
# --------------------------------------------------------------------------------------------------

MIXED_SCHEDULE = (1, 2, 4, 7, 25)  # chunk sizes cycled through one validation stream
SPEED_CHUNKS = (4, 12)  # chunk sizes the int8 speed gate measures (4 = the 320 ms packet of the report)


def load_official_decoder(checkpoint_dir: Path) -> tuple[nn.Module, Any]:
    """The official decoder (fp32, eval) and tokenizer config from ``checkpoint_dir/speech_tokenizer``."""
    qwen_tts()
    from qwen_tts.core import Qwen3TTSTokenizerV2Model

    folder = Path(checkpoint_dir) / "speech_tokenizer"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}/config.json not found (expected the official checkpoint layout)")
    model = Qwen3TTSTokenizerV2Model.from_pretrained(folder, dtype=torch.float32).eval()
    decoder = model.decoder.float().eval()
    return decoder, model.config


def random_codes(frames: int, seed: int, codebook_size: int = 2048, num_quantizers: int = 16,
                 stickiness: float = 0.0) -> np.ndarray:
    """Seeded codes [frames, Q]. With ``stickiness`` > 0 each code repeats its predecessor with that
    probability and values follow a skewed (Zipf-like) usage, closer to real codec streams than uniform."""
    rng = np.random.default_rng(seed)
    if stickiness <= 0:
        return rng.integers(0, codebook_size, (frames, num_quantizers), dtype=np.int64)
    ranks = np.arange(1, codebook_size + 1, dtype=np.float64)
    p = 1.0 / ranks
    p /= p.sum()
    perm = np.stack([rng.permutation(codebook_size) for _ in range(num_quantizers)], axis=1)
    draws = rng.choice(codebook_size, size=(frames, num_quantizers), p=p)
    codes = perm[draws, np.arange(num_quantizers)]
    keep = rng.random((frames, num_quantizers)) < stickiness
    for t in range(1, frames):
        codes[t] = np.where(keep[t], codes[t - 1], codes[t])
    return codes.astype(np.int64)


def calibration_set(seed: int, codebook_size: int, num_quantizers: int,
                    frames: int = 32, sequences: int = 4) -> dict[str, np.ndarray]:
    """Codes for int8 calibration: half uniform, half "sticky" skewed streams (shipped with the export)."""
    return {f"seq{i}": random_codes(frames, seed + i, codebook_size, num_quantizers, 0.7 * (i % 2))
            for i in range(sequences)}


@torch.no_grad()
def offline_decode(decoder: nn.Module, codes: np.ndarray) -> np.ndarray:
    """One official forward over the whole sequence (not ``chunked_decode``: approximate past 300 frames)."""
    wav = decoder(torch.from_numpy(np.ascontiguousarray(codes.T, dtype=np.int64))[None])
    return wav.reshape(-1).numpy().astype(np.float32)


def _runtime(model_path: Path, providers: Sequence[str] | None = ("CPUExecutionProvider",),
             threads: int | None = None) -> Any:
    """The runtime decoder, minus its "fp16 on CPU" advice (export measures fp16 on CPU on purpose)."""
    from ..runtime.backends.onnxruntime.decoder import StreamingDecoder

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the fp16 decoder is meant for GPU", RuntimeWarning)
        return StreamingDecoder(model_path, providers=providers, threads=threads)


def stream_decode(model_path: Path, codes: np.ndarray, schedule: Sequence[int] = MIXED_SCHEDULE,
                  threads: int | None = None, providers: Sequence[str] | None = None) -> np.ndarray:
    """Decode ``codes`` through the runtime class, cycling chunk sizes through ``schedule``."""
    return _stream(_runtime(model_path, providers, threads), codes, schedule)


def _stream(dec: Any, codes: np.ndarray, schedule: Sequence[int]) -> np.ndarray:
    out, start, i = [], 0, 0
    while start < codes.shape[0]:
        n = schedule[i % len(schedule)]
        out.append(dec.decode(codes[start : start + n]))
        start, i = start + n, i + 1
    return np.concatenate(out)


def ms_per_frame(model_path: Path, chunk: int, threads: int = 1, frames: int = 24, repeats: int = 3,
                 clock: str = "cpu", seed: int = 7) -> float:
    """Milliseconds per frame on the CPU provider for calls of ``chunk`` frames.

    ``clock="cpu"`` (process CPU time, median of repeats, 1 thread) is the comparison metric: the build
    machines are shared and wall time there swings 2-3x with neighbours, CPU time barely moves.
    ``clock="wall"`` returns the best-of-repeats wall time, for reporting latency at ``threads``.
    """
    dec = _runtime(model_path, threads=threads)
    codes = random_codes(max(frames, chunk), seed, dec.codebook_size, dec.num_quantizers)
    timer = time.process_time if clock == "cpu" else time.perf_counter
    dec.decode(codes[:chunk])  # warm-up: the first run allocates and plans
    samples = []
    for _ in range(repeats):
        dec.reset()
        n = 0
        t0 = timer()
        for start in range(0, codes.shape[0] - chunk + 1, chunk):
            dec.decode(codes[start : start + chunk])
            n += chunk
        samples.append((timer() - t0) / n * 1000.0)
    return float(np.median(samples)) if clock == "cpu" else min(samples)


def cpu_speedup(reference: Path, candidate: Path, chunks: Sequence[int] = SPEED_CHUNKS) -> dict[str, Any]:
    """CPU-cost speedup of ``candidate`` over ``reference`` (1 thread), the minimum over ``chunks``."""
    ref = {c: ms_per_frame(reference, c) for c in chunks}
    cand = {c: ms_per_frame(candidate, c) for c in chunks}
    return {
        "cpu_speedup": min(ref[c] / cand[c] for c in chunks),
        "cpu_ms_per_frame": {f"chunk{c}": round(cand[c], 2) for c in chunks},
        "fp32_cpu_ms_per_frame": {f"chunk{c}": round(ref[c], 2) for c in chunks},
        "speed_measure": "process CPU time per frame, 1 thread, CPU provider, median of 3",
    }


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def fidelity_metrics(test: np.ndarray, offline: np.ndarray, reference: np.ndarray, reference_name: str,
                     sample_rate: int) -> dict[str, Any]:
    """The parity record of one variant: exactness vs the offline decode, SNR/log-mel vs ``reference``."""
    return {
        "stream_vs_offline_max_abs": fidelity.max_abs(offline, test),
        "snr_db": _finite(fidelity.snr_db(reference, test)),
        "logmel_dist": fidelity.logmel_distance(reference, test, sample_rate),
        "cosine": fidelity.cosine(reference, test),
        "reference": reference_name,
    }


# --------------------------------------------------------------------------------------------------
# ONNX: export, metadata, variants, validation
# --------------------------------------------------------------------------------------------------


def _metadata(module: StatefulDecoder, config: Any, precision: str) -> dict[str, Any]:
    pol = policies.policy("decoder", precision)
    return {
        "format_version": FORMAT_VERSION,
        "precision": precision,
        "sample_rate": int(config.output_sample_rate),
        "samples_per_frame": module.samples_per_frame,
        "num_quantizers": module.num_quantizers,
        "codebook_size": module.codebook_size,
        "sliding_window": module.window,
        "codes_input": CODES_INPUT,
        "pcm_output": PCM_OUTPUT,
        "state": [dict(asdict(s), input=s.input, output=s.output) for s in module.specs],
        "initial_state": "zeros",
        "providers": list(pol.providers),
        "note": pol.note,
    }


def _set_metadata(path: Path, meta: dict[str, Any]) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta, sort_keys=True)
    model.doc_string = f"Qwen3-TTS 12 Hz codec decoder, stateful streaming, {meta['precision']}"
    onnx.save(model, str(path))


def export_fp32(module: StatefulDecoder, path: Path, example_frames: int = 3) -> None:
    """Export with the dynamo exporter (the TorchScript one fails on this model), frame axis dynamic."""
    codes = torch.zeros((example_frames, module.num_quantizers), dtype=torch.int64)
    state = module.initial_state()
    frames = torch.export.Dim("frames", min=1)
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # the exporter prints progress
        program = torch.export.export(module, (codes, *state),
                                      dynamic_shapes=({0: frames}, tuple(None for _ in state)))
        onnx_program = torch.onnx.export(
            program, (codes, *state), dynamo=True, opset_version=OPSET, optimize=True, verify=False,
            input_names=[CODES_INPUT, *(s.input for s in module.specs)],
            output_names=[PCM_OUTPUT, *(s.output for s in module.specs)],
        )
    onnx_program.save(str(path))


def node_scope(node: Any) -> str:
    """Module path the exporter recorded for an ONNX node ("" for top-level glue or unknown)."""
    import ast

    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            scopes = ast.literal_eval(prop.value)
            return scopes[-2] if len(scopes) >= 2 else ""
    return ""


def precision_map(model: Any, precision: str) -> dict[str, list[str]]:
    """ONNX node names per assigned precision under the decoder policy for ``precision``."""
    pol = policies.policy("decoder", precision)
    assigned: dict[str, list[str]] = {}
    for node in model.graph.node:
        assigned.setdefault(pol.precision_for(node_scope(node), node.op_type), []).append(node.name)
    return assigned


def convert_fp16(fp32_path: Path, path: Path) -> dict[str, int]:
    """fp16 graph with the policy's fp32 islands; graph inputs/outputs (codes, pcm, state) stay fp32.
    Returns the number of fp32-graph nodes assigned to each precision."""
    import onnx

    model = onnx.load(str(fp32_path))
    assigned = precision_map(model, "fp16")
    onnx.save(mixed_precision(model, set(assigned.get("fp32", []))), str(path))
    return {k: len(v) for k, v in assigned.items()}


def mixed_precision(model: Any, fp32_nodes: set[str]) -> Any:
    """Rewrite an fp32 graph so every node not in ``fp32_nodes`` computes in fp16.

    Written here rather than using onnxruntime's ``float16`` converter because that one round-trips
    every tensor between two blocked nodes through fp16 (islands are not really fp32) and emits
    non-topological graphs. Here each float tensor lives in its producer's precision, one Cast per
    (tensor, precision) bridges a boundary, initializers become fp16 only when no fp32 node reads them,
    and graph inputs/outputs keep fp32.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    f32, f16 = TensorProto.FLOAT, TensorProto.FLOAT16
    model = onnx.shape_inference.infer_shapes(model, data_prop=True)
    graph = model.graph
    elem: dict[str, int] = {}
    for vi in [*graph.input, *graph.output, *graph.value_info]:
        elem[vi.name] = vi.type.tensor_type.elem_type
    inits = {t.name: t for t in graph.initializer}
    for t in graph.initializer:
        elem[t.name] = t.data_type
    for node in graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    elem[node.output[0]] = a.t.data_type
    is_fp16 = {n.name: n.name not in fp32_nodes for n in graph.node}

    def float_inputs(node: Any) -> list[int]:
        return [i for i, name in enumerate(node.input) if name and elem.get(name) == f32]

    # Precision each float tensor is stored in: its producer's (initializers: fp16 iff only fp16 readers).
    home: dict[str, int] = {vi.name: f32 for vi in graph.input}
    readers: dict[str, set[bool]] = {}
    for node in graph.node:
        for i in float_inputs(node):
            readers.setdefault(node.input[i], set()).add(is_fp16[node.name])
    for name in inits:
        if elem.get(name) == f32:
            home[name] = f16 if readers.get(name) == {True} else f32
    for node in graph.node:
        for out in node.output:
            if elem.get(out) == f32:
                home[out] = f16 if is_fp16[node.name] else f32

    graph_outputs = {o.name for o in graph.output}
    casts: dict[tuple[str, int], str] = {}
    new_nodes = []

    def cast(name: str, to: int) -> str:
        key = (name, to)
        if key not in casts:
            casts[key] = f"{name}__as_{'fp16' if to == f16 else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [casts[key]], to=to, name=f"{casts[key]}_cast"))
        return casts[key]

    for node in graph.node:
        want = f16 if is_fp16[node.name] else f32
        for i in float_inputs(node):
            if home.get(node.input[i], f32) != want:
                node.input[i] = cast(node.input[i], want)
        renamed = []
        if want == f16:
            for a in node.attribute:
                if node.op_type == "Cast" and a.name == "to" and a.i == f32:
                    a.i = f16
                if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == f32:
                    a.t.CopyFrom(_to_fp16_tensor(numpy_helper.to_array(a.t), a.t.name))
            for i, out in enumerate(node.output):
                if out in graph_outputs and home.get(out) == f16:  # graph outputs stay fp32
                    node.output[i] = f"{out}__fp16"
                    renamed.append((node.output[i], out))
        new_nodes.append(node)
        for src, dst in renamed:
            new_nodes.append(helper.make_node("Cast", [src], [dst], to=f32, name=f"{dst}_to_fp32"))
            home[src] = f16
    for t in graph.initializer:
        if home.get(t.name) == f16:
            t.CopyFrom(_to_fp16_tensor(numpy_helper.to_array(t), t.name))
    for vi in graph.value_info:
        if home.get(vi.name) == f16:
            vi.type.tensor_type.elem_type = f16
    del graph.node[:]
    graph.node.extend(new_nodes)
    return model


def _to_fp16_tensor(array: np.ndarray, name: str) -> Any:
    from onnx import numpy_helper

    limit = float(np.finfo(np.float16).max)
    return numpy_helper.from_array(np.clip(array, -limit, limit).astype(np.float16), name)


class _CalibrationReader:
    """Feeds for int8 calibration: each sequence streamed through the fp32 graph, state carried."""

    def __init__(self, fp32_path: Path, sequences: dict[str, np.ndarray], chunk: int) -> None:
        self._dec = _runtime(fp32_path)
        self._feeds = self._iterate(sequences, chunk)

    def _iterate(self, sequences: dict[str, np.ndarray], chunk: int) -> Iterator[dict[str, np.ndarray]]:
        for codes in sequences.values():
            self._dec.reset()
            for start in range(0, codes.shape[0], chunk):
                part = codes[start : start + chunk]
                feed = {k: v.copy() for k, v in self._dec.input_feed(part).items()}
                self._dec.decode(part)
                yield feed

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # onnxruntime's reader protocol; one pass is all we use
        pass


def quantize_int8(fp32_path: Path, path: Path, sequences: dict[str, np.ndarray],
                  chunk: int = CALIBRATION_CHUNK) -> dict[str, int]:
    """Static QDQ int8 on the policy's nodes: per-channel symmetric int8 weights, uint8 activations with
    99.999th-percentile ranges. Calibration streams the real state, so carried contexts are in range too.

    Measured on the 0.6b shape (random weights): percentile ranges gave +1 dB SNR over min/max; a 3x
    larger calibration set changed nothing; onnxruntime fuses the QDQ pairs into QLinearConv.
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = onnx.load(str(fp32_path))
    assigned = precision_map(model, "int8")
    nodes = assigned.get("int8", [])
    if not nodes:
        raise ValueError("int8 policy selects no nodes")
    by_name = {n.name: n.op_type for n in model.graph.node}
    del model
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime advises "pre-processing" and prints calibration chatter
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            quantize_static(
                str(fp32_path), str(path), _CalibrationReader(fp32_path, sequences, chunk),
                quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                op_types_to_quantize=sorted({by_name[n] for n in nodes}),
                calibrate_method=CalibrationMethod.Percentile,
                extra_options={"CalibPercentile": 99.999},
            )
    finally:
        root.setLevel(level)
    return {k: len(v) for k, v in assigned.items()}


def validate(path: Path, module_meta: dict[str, Any]) -> None:
    """ONNX checker plus an onnxruntime run of a 1- and a 3-frame chunk from the zero state."""
    import onnx

    onnx.checker.check_model(str(path), full_check=True)
    dec = _runtime(path)
    codes = random_codes(4, 0, dec.codebook_size, dec.num_quantizers)
    pcm = np.concatenate([dec.decode(codes[:1]), dec.decode(codes[1:])])
    if pcm.shape != (4 * module_meta["samples_per_frame"],) or not np.all(np.isfinite(pcm)):
        raise RuntimeError(f"{path.name}: onnxruntime run produced {pcm.shape} / non-finite samples")
    if dec.frames_decoded != 4:
        raise RuntimeError(f"{path.name}: position counter {dec.frames_decoded} after 4 frames")


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


def export_decoder(
    checkpoint_dir: Path,
    out_dir: Path,
    precisions: Sequence[str] = DEFAULT_PRECISIONS,
    progress: Callable[[str], None] | None = None,
    *,
    validation_frames: int = 100,
    seed: int = 1234,
    calibration: dict[str, np.ndarray] | None = None,
    step: Callable[[str], None] | None = None,
) -> list[dict[str, Any]]:
    """Export the streaming decoder variants into ``out_dir``; return one manifest entry per shipped file.

    The fp32 graph is always exported and shipped first: it is the reference the other variants are
    gated against. Each variant is validated (checker + onnxruntime run) and gated (``quant.gates``); a
    failing fp16/int8 variant is deleted and the reason recorded in the fp32 entry's ``meta["rejected"]``.
    A failing fp32 graph raises: that is an export bug, not a precision trade-off. ``calibration``
    (name → codes [T, Q]) replaces the generated int8 calibration streams, e.g. with codes the
    checkpoint's own codec encoder produced from real speech.
    """
    say = progress or (lambda _msg: None)
    done = step or (lambda _label: None)  # one call per finished step, for the export progress bar
    unknown = [p for p in precisions if p not in DEFAULT_PRECISIONS]
    if unknown:
        raise ValueError(f"unsupported decoder precisions {unknown}; choose from {DEFAULT_PRECISIONS}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    say("decoder: loading the official codec decoder")
    decoder, config = load_official_decoder(checkpoint_dir)
    module = StatefulDecoder(decoder).eval()
    if module.samples_per_frame != int(config.decode_upsample_rate):
        raise ValueError(f"decoder upsamples {module.samples_per_frame}x but config.json says "
                         f"{config.decode_upsample_rate}")
    sample_rate = int(config.output_sample_rate)
    codes = random_codes(validation_frames, seed, module.codebook_size, module.num_quantizers, stickiness=0.5)
    offline = offline_decode(decoder, codes)

    t0 = time.perf_counter()
    say("decoder: exporting the fp32 streaming graph (dynamo, opset 18)")
    fp32_path = out_dir / "decoder.fp32.onnx"
    meta = _metadata(module, config, "fp32")
    export_fp32(module, fp32_path)
    _set_metadata(fp32_path, meta)
    validate(fp32_path, meta)
    fp32_pcm = stream_decode(fp32_path, codes)
    fid = fidelity_metrics(fp32_pcm, offline, offline, OFFLINE_REFERENCE, sample_rate)
    fid.update(frames=validation_frames, chunk_schedule=list(MIXED_SCHEDULE))
    failures = gates.gate("decoder", "fp32").failures(fid)
    if failures:
        raise RuntimeError(f"fp32 streaming decoder does not match the offline decode: {'; '.join(failures)}")
    say(f"decoder: fp32 ok, stream vs offline max |Δ| = {fid['stream_vs_offline_max_abs']:.2e} "
        f"({time.perf_counter() - t0:.0f} s)")
    done("decoder fp32")
    rejected: dict[str, str] = {}
    fp32_entry = _entry("decoder", fp32_path.name, "onnx", "fp32", fid,
                        {**_entry_meta(meta, "fp32"), "rejected": rejected})
    initial = {s.name: t.numpy() for s, t in zip(module.specs, module.initial_state(), strict=True)}
    np.savez(out_dir / STATE_FILE, **initial)
    entries = [fp32_entry, _entry("decoder_state", STATE_FILE, "npz", "fp32", {}, {
        "kind": "initial_state", "state": meta["state"],
        "note": "all-zero state at position 0; one layout for every decoder precision"})]

    for precision in (p for p in DEFAULT_PRECISIONS[1:] if p in precisions):
        t0 = time.perf_counter()
        try:
            entry, vfid = _export_variant(precision, module, config, fp32_path, out_dir, say, seed,
                                          calibration)
            path = out_dir / entry["file"]
            pcm = stream_decode(path, codes)
            vfid.update(fidelity_metrics(pcm, offline, fp32_pcm, FP32_REFERENCE, sample_rate))
            vfid.update(frames=validation_frames, chunk_schedule=list(MIXED_SCHEDULE))
            if precision == "int8":
                say("decoder: measuring int8 vs fp32 CPU cost")
                vfid.update(cpu_speedup(fp32_path, path))
            failures = gates.gate("decoder", precision).failures(vfid)
        except Exception as exc:  # an optional variant that cannot be built is refused, not fatal
            vfid, failures = {}, [f"{precision} export failed: {type(exc).__name__}: {exc}"]
        measured = (f"snr {vfid['snr_db']:.1f} dB, log-mel {vfid['logmel_dist']:.3f} dB: "
                    if vfid.get("snr_db") is not None and "logmel_dist" in vfid else "")
        verdict = "REFUSED, " + "; ".join(failures) if failures else "passes its gate"
        say(f"decoder: {precision} {measured}{verdict} ({time.perf_counter() - t0:.0f} s)")
        done(f"decoder {precision}")
        if failures:
            rejected[precision] = "; ".join(failures)
            fp32_entry["meta"].setdefault("rejected_fidelity", {})[precision] = vfid
            for name in (f"decoder.{precision}.onnx", CALIBRATION_FILE if precision == "int8" else None):
                if name:
                    (out_dir / name).unlink(missing_ok=True)
            continue
        entries.append(entry)
        if precision == "int8":
            entries.append(_entry("calibration", CALIBRATION_FILE, "npz", "int8", {}, {
                "kind": "calibration_codes", "chunk": CALIBRATION_CHUNK,
                "note": "codes streamed through the fp32 graph (state carried) to calibrate int8"}))
    return entries


def _entry(role: str, file: str, fmt: str, precision: str, fid: dict[str, Any],
           meta: dict[str, Any]) -> dict[str, Any]:
    return {"role": role, "file": file, "format": fmt, "precision": precision, "fidelity": fid, "meta": meta}


def _export_variant(precision: str, module: StatefulDecoder, config: Any, fp32_path: Path, out_dir: Path,
                    say: Callable[[str], None], seed: int,
                    calibration: dict[str, np.ndarray] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Build, label and validate one derived variant; the caller measures and gates it."""
    path = out_dir / f"decoder.{precision}.onnx"
    meta = _metadata(module, config, precision)
    extra: dict[str, Any] = {}
    if precision == "fp16":
        say("decoder: converting to fp16 with the policy's fp32 islands")
        extra["node_precisions"] = convert_fp16(fp32_path, path)
    else:
        say("decoder: static int8 QDQ quantisation (calibrated on shipped codes)")
        calib = calibration or calibration_set(seed + 100, module.codebook_size, module.num_quantizers)
        np.savez(out_dir / CALIBRATION_FILE, **calib)
        extra["node_precisions"] = quantize_int8(fp32_path, path, calib, CALIBRATION_CHUNK)
        extra["calibration_file"] = CALIBRATION_FILE
    _set_metadata(path, meta)
    validate(path, meta)
    entry = _entry("decoder", path.name, "onnx", precision, {}, {**_entry_meta(meta, precision), **extra})
    return entry, entry["fidelity"]


def _entry_meta(meta: dict[str, Any], precision: str) -> dict[str, Any]:
    pol = policies.policy("decoder", precision)
    return {
        "sample_rate": meta["sample_rate"],
        "samples_per_frame": meta["samples_per_frame"],
        "num_quantizers": meta["num_quantizers"],
        "codebook_size": meta["codebook_size"],
        "sliding_window": meta["sliding_window"],
        "state_file": STATE_FILE,
        "intended_providers": list(pol.providers),
        "precision_note": pol.note,
        "precision_policy": pol.table(),
        "gate": gates.gate("decoder", precision).as_dict(),
        "opset": OPSET,
    }


def parity_report(checkpoint_dir: Path, export_dir: Path, frames: int = 100, seed: int = 4321,
                  schedule: Sequence[int] = MIXED_SCHEDULE) -> dict[str, Any]:
    """``{"decoder": {precision: {stream_vs_offline_max_abs, snr_db, logmel_dist, …}}}`` for every
    ``decoder.<precision>.onnx`` in ``export_dir``: the same metrics and references as the export gates."""
    decoder, config = load_official_decoder(checkpoint_dir)
    module = StatefulDecoder(decoder)
    codes = random_codes(frames, seed, module.codebook_size, module.num_quantizers, stickiness=0.5)
    offline = offline_decode(decoder, codes)
    sample_rate = int(config.output_sample_rate)
    report: dict[str, Any] = {}
    fp32_path = Path(export_dir) / "decoder.fp32.onnx"
    fp32_pcm = stream_decode(fp32_path, codes, schedule)
    report["fp32"] = fidelity_metrics(fp32_pcm, offline, offline, OFFLINE_REFERENCE, sample_rate)
    for precision in ("fp16", "int8"):
        path = Path(export_dir) / f"decoder.{precision}.onnx"
        if path.is_file():
            pcm = stream_decode(path, codes, schedule)
            report[precision] = fidelity_metrics(pcm, offline, fp32_pcm, FP32_REFERENCE, sample_rate)
    return {"decoder": report}
