"""12 Hz codec encoder (Base models) → ONNX fp32: waveform ``[1, N]`` at 24 kHz in, codes ``[T, 16]`` out.

ICL voice cloning needs the reference clip as codec codes. The official ``encode`` is Mimi (SEANet, a causal
transformer, a stride-2 downsample, split RVQ) keeping the first 16 codebooks, ``T = ceil(N / 1920)``. Two
export traps are handled here: ``MimiConv1d`` computes its right padding with float division on tensor
buffers, which dynamo cannot trace, so the export swaps in the same arithmetic on Python integers (equal
codes, checked); and a trace at a multiple of 960 samples freezes shapes, so the trace length is not one.
The wave is neither padded nor truncated (that would change the last frame), and no sliding window is added
(the official transformer attends to every past frame). Codes must equal the official ``encode`` exactly.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ONNX_FILE = "codec_encoder.fp32.onnx"
TRACE_SAMPLES = 24001  # not a multiple of 960 (see the module docstring)
CHECK_SAMPLES = (3841, 24000, 25000, 50001, 96007)
NUM_QUANTIZERS = 16


@contextlib.contextmanager
def integer_conv_padding() -> Iterator[None]:
    """``MimiConv1d`` causal padding computed on Python ints while exporting (same values as upstream)."""
    from transformers.models.mimi import modeling_mimi

    original = modeling_mimi.MimiConv1d.forward

    def forward(self, hidden_states, padding_cache=None):
        if not self.causal or padding_cache is not None:
            return original(self, hidden_states, padding_cache)
        k = (self.conv.kernel_size[0] - 1) * self.conv.dilation[0] + 1
        s = self.conv.stride[0]
        total = k - s
        length = hidden_states.shape[-1]
        frames = (length - k + total + s - 1) // s  # ceil((length - k + total) / s), as upstream
        extra = frames * s + k - total - length
        return self.conv(self._pad1d(hidden_states, (total, extra), mode=self.pad_mode))

    modeling_mimi.MimiConv1d.forward = forward
    try:
        yield
    finally:
        modeling_mimi.MimiConv1d.forward = original


def _wrapper(tokenizer: Any) -> Any:
    import torch

    class CodecEncoder(torch.nn.Module):
        """wave [1, N] -> codes [T, 16] (the official encode's kept codebooks, batch of one)."""

        def __init__(self, encoder: Any) -> None:
            super().__init__()
            self.encoder = encoder

        def forward(self, wave: torch.Tensor) -> torch.Tensor:
            out = self.encoder.encode(wave.unsqueeze(1), num_quantizers=NUM_QUANTIZERS, return_dict=True)
            return out.audio_codes[0].transpose(0, 1)

    return CodecEncoder(tokenizer.encoder.float().eval()).eval()


def official_codes(tokenizer: Any, wave: np.ndarray) -> np.ndarray:
    """The official ``Qwen3TTSTokenizerV2Model.encode`` of one 24 kHz clip: ``[T, 16]`` int64."""
    import torch

    x = torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32))[None]
    with torch.no_grad():
        out = tokenizer.encode(x, padding_mask=torch.ones_like(x, dtype=torch.long), return_dict=True)
    return out.audio_codes[0].numpy()


def _check(path: Path, tokenizer: Any, seed: int = 0) -> dict[str, Any]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(seed)
    mismatches, frames = 0, 0
    for n in CHECK_SAMPLES:
        wave = (0.1 * rng.standard_normal(n)).astype(np.float32)
        ref = official_codes(tokenizer, wave)
        got = session.run(None, {"wave": wave[None]})[0]
        if got.shape != ref.shape:
            raise RuntimeError(f"codec encoder ONNX gives {got.shape} codes for {n} samples, official {ref.shape}")
        mismatches += int((got != ref).sum())
        frames += len(ref)
    return {"code_mismatches": mismatches, "frames": frames, "samples": list(CHECK_SAMPLES),
            "reference": "official Qwen3TTSTokenizerV2Model.encode (torch fp32) on the same wave"}


def export_codec_encoder(checkpoint_dir: Path, out_dir: Path, precisions: Sequence[str] = ("fp32",),
                         progress: Callable[[str], None] | None = None, *,
                         step: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Write the codec encoder graph into ``out_dir``; return its manifest entry (codes equal official, or raise)."""
    import torch

    from .decoder_onnx import load_official_tokenizer

    say = progress or (lambda _msg: None)
    if list(precisions) != ["fp32"]:
        raise ValueError(f"the codec encoder ships in fp32 only (codes must equal the official ones), got "
                         f"{list(precisions)}")
    t0 = time.perf_counter()
    say("codec encoder: exporting the fp32 graph (dynamo, opset 18)")
    tokenizer = load_official_tokenizer(checkpoint_dir)
    module = _wrapper(tokenizer)
    path = Path(out_dir) / ONNX_FILE
    example = torch.zeros(1, TRACE_SAMPLES)
    samples = torch.export.Dim("samples", min=1920, max=24000 * 600)
    with torch.no_grad(), integer_conv_padding(), contextlib.redirect_stdout(io.StringIO()):
        torch.onnx.export(module, (example,), str(path), dynamo=True, opset_version=18, input_names=["wave"],
                          output_names=["codes"], dynamic_shapes={"wave": {1: samples}})
    fidelity = _check(path, tokenizer)
    if fidelity["code_mismatches"]:
        raise RuntimeError(f"codec encoder ONNX differs from the official encode in {fidelity['code_mismatches']} "
                           f"of {fidelity['frames'] * NUM_QUANTIZERS} codes")
    say(f"codec encoder: fp32 ok, 0 code mismatches over {fidelity['frames']} frames "
        f"({time.perf_counter() - t0:.0f} s)")
    if step:
        step("codec encoder fp32")
    st = json.loads((Path(checkpoint_dir) / "speech_tokenizer" / "config.json").read_text(encoding="utf-8"))
    meta = {"input": "wave [1, N] float32 at 24 kHz (N >= 1920)", "output": "codes [ceil(N / 1920), 16] int64",
            "num_quantizers": NUM_QUANTIZERS, "samples_per_frame": int(st.get("encode_downsample_rate", 1920))}
    return [{"role": "codec_encoder", "file": ONNX_FILE, "format": "onnx", "precision": "fp32", "meta": meta,
             "fidelity": fidelity}]
