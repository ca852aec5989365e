"""The code predictor's output heads as weight-only int8 ONNX graphs, run beside the llama.cpp predictor.

The llama.cpp predictor returns the final-normed hidden state and head j turns it into codebook j's logits on
the host. In float32 the 15 heads are 126 MB at 0.6B (15 x 2048 x 1024 x 4 bytes), read once per frame: on a
bandwidth-bound CPU as many bytes as a fifth of the q4_k_m predictor. Stored as blockwise int8 (onnxruntime's
``MatMulNBits``, int8 activations in the kernel) they are a quarter of that.

One graph per step, because one ONNX Runtime session runs every node of its graph whatever output is asked
for. The graphs travel in one bundle file: a safetensors file holding each step's serialized ONNX model as a
uint8 tensor (``step_00`` ...), so the bundle keeps one checksummed component and any graph can be taken out
and opened as it is.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

HEADS_PRECISIONS = ("int8",)
HEADS_FORMAT = "onnx-steps"  # the bundle component format: safetensors of per-step ONNX models
HEADS_FILE = "predictor_heads.{precision}.safetensors"
INPUT, OUTPUT = "hidden", "logits"


def step_key(j: int) -> str:
    return f"step_{j:02d}"


class QuantizedHeads:
    """``heads(j, hidden)``: codebook j's logits for hidden states (H,) or (n, H), as float32 (V,) or (n, V).

    ``steps``, ``hidden_size`` and ``codebook_size`` are read from the file (its metadata and graphs); the
    predictor that uses them checks them against its own. Each session runs on the calling thread (one intra-op
    thread): the predictor calls it between llama.cpp decodes, when llama.cpp's threads wait."""

    def __init__(self, path: Path | str) -> None:
        import onnxruntime as ort
        from safetensors import safe_open

        from ...bundle import BundleError

        path = Path(path)
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if meta.get("format") != HEADS_FORMAT or not str(meta.get("steps", "")).isdigit():
                raise BundleError(f"{path.name} is not a predictor-heads file (format {meta.get('format')!r}); "
                                  "re-export the bundle")
            self.steps = int(meta["steps"])
            keys = [step_key(j) for j in range(self.steps)]
            have = set(f.keys())
            missing = [k for k in keys if k not in have]
            if missing:
                raise BundleError(f"{path.name} lacks the graphs {missing} of its {self.steps} steps; re-export")
            blobs = [f.get_tensor(k).tobytes() for k in keys]
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        self.precision = meta.get("precision", "int8")
        self.sessions = [ort.InferenceSession(b, opts, providers=["CPUExecutionProvider"]) for b in blobs]
        (inp,), (out,) = self.sessions[0].get_inputs(), self.sessions[0].get_outputs()
        self.hidden_size, self.codebook_size = inp.shape[-1], out.shape[-1]
        for j, s in enumerate(self.sessions):
            (inp,), (out,) = s.get_inputs(), s.get_outputs()
            if (inp.name, out.name, inp.shape[-1], out.shape[-1]) != (INPUT, OUTPUT, self.hidden_size,
                                                                       self.codebook_size):
                raise BundleError(f"{path.name}: step {j}'s graph maps {inp.name}{inp.shape} to {out.name}"
                                  f"{out.shape}; every step must map {INPUT}[n, {self.hidden_size}] -> "
                                  f"{OUTPUT}[n, {self.codebook_size}]")
        self._outs = [OUTPUT]

    def __call__(self, j: int, hidden: np.ndarray) -> np.ndarray:
        x = np.asarray(hidden, dtype=np.float32)
        one = x.ndim == 1
        y = self.sessions[j].run(self._outs, {INPUT: x.reshape(1, -1) if one else x})[0]
        return y[0] if one else y
