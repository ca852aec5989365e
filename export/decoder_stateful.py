"""The official 12 Hz codec decoder as a stateful streaming torch module (what ``decoder_onnx`` exports).

The decoder is fully causal with zero lookahead, so a decoder that carries the right state decodes any
chunking of a code sequence to exactly the samples of one offline forward. ``StatefulDecoder`` wraps the
official module and threads that state explicitly: the most recent post-RoPE K/V positions per layer
(sliding window), the left context of every causal convolution, one input sample of overlap for every
transposed convolution whose kernel is longer than its stride, and the absolute RoPE position. Every state
tensor has a fixed shape, so one graph serves every chunk size N >= 1 from the all-zero state.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn


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
    ``blocks.i``, ``head_snake``, ``head_conv``) become the ONNX name scopes that ``quant.onnx_policy``
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
