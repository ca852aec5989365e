"""Weight-only int8 predictor heads for the llama.cpp engine (``--predictor-heads int8``).

Each of the 15 code-predictor heads (codebook j's ``lm_head``) becomes a one-node ONNX graph: a float32 MatMul
``hidden[n, H] @ W_j^T`` quantised by onnxruntime's ``MatMulNBitsQuantizer`` (symmetric blocks of 32, int8
activations in the kernel). The graphs go into one safetensors file (``runtime/backends/onnxruntime/heads.py``
says why and reads it). The heads do not depend on the talker precision, so one file serves every GGUF
precision of the bundle.

Fidelity is measured here against the float32 heads on hidden states shaped like the predictor's (standard
normal through its final RMSNorm weight) and gated (``quant/gates.py``); the bench measures it end to end
against the official model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..quant.gates import gate
from ..runtime.backends.onnxruntime.heads import (
    HEADS_FILE,
    HEADS_FORMAT,
    HEADS_PRECISIONS,
    INPUT,
    OUTPUT,
    QuantizedHeads,
    step_key,
)
from .llama_gguf import _config, _read_tensors

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations (VNNI / AVX2 dot products); level 0 computes in fp32 and is slower
SAMPLES = 256  # hidden states the fidelity check uses


class HeadsExportError(ValueError):
    """A heads precision this exporter does not write, or a quantised head that fails its gate."""


def head_graph(weight: np.ndarray, bits: int) -> bytes:
    """One head ``weight`` (V, H) float32 as a serialized ONNX model ``hidden[n, H] -> logits[n, V]``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    v, h = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", [INPUT, "weight_t"], [OUTPUT], name="head")], "predictor_head",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["n", h])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["n", v])],
        [numpy_helper.from_array(np.ascontiguousarray(weight.T, dtype=np.float32), "weight_t")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    quant_logger = logging.getLogger("onnxruntime.quantization")
    level = quant_logger.level
    quant_logger.setLevel(logging.WARNING)  # one INFO line per node otherwise
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            q = MatMulNBitsQuantizer(model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=True,
                                     accuracy_level=ACCURACY_LEVEL, op_types_to_quantize=("MatMul",))
            q.process()
    finally:
        quant_logger.setLevel(level)
    out = q.model.model
    if [n.op_type for n in out.graph.node] != ["MatMulNBits"]:
        raise HeadsExportError(f"the quantizer left {[n.op_type for n in out.graph.node]}, not one MatMulNBits")
    onnx.checker.check_model(out)
    return out.SerializeToString()


def measure(heads: QuantizedHeads, weights: Sequence[np.ndarray], norm: np.ndarray | None,
            seed: int = 0) -> dict[str, float]:
    """Logit cosine (worst step's worst sample), top-1 agreement and max |Δ| against the float32 heads."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((SAMPLES, weights[0].shape[1])).astype(np.float32)
    if norm is not None:
        x *= norm.astype(np.float32)
    cos_min, top1, max_abs = 1.0, [], 0.0
    for j, w in enumerate(weights):
        ref = x @ w.T
        got = heads(j, x)
        num = np.sum(ref * got, axis=1)
        den = np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1)
        cos_min = min(cos_min, float(np.min(num / np.maximum(den, 1e-30))))
        top1.append(float(np.mean(ref.argmax(1) == got.argmax(1))))
        max_abs = max(max_abs, float(np.abs(ref - got).max()))
    return {"logit_cos_min": cos_min, "top1": float(np.mean(top1)), "top1_min": float(min(top1)),
            "max_abs": max_abs, "samples": SAMPLES}


def export_predictor_heads(checkpoint_dir: Path, out_dir: Path, precisions: Sequence[str],
                           progress: Callable[[str], None] | None = None, *,
                           step: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Stage exporter: ``predictor_heads.P.safetensors`` for each precision P (``int8``), gated."""
    from safetensors.numpy import save_file

    say = progress or (lambda _msg: None)
    done = step or (lambda _label: None)
    bad = [p for p in precisions if p not in HEADS_PRECISIONS]
    if bad:
        raise HeadsExportError(f"unsupported predictor-heads precisions {bad}; choose from "
                               f"{', '.join(HEADS_PRECISIONS)}")
    cfg = _config(Path(checkpoint_dir))
    tc = cfg["talker_config"]
    n = int(tc["code_predictor_config"].get("num_code_groups", tc["num_code_groups"])) - 1
    sd = _read_tensors(Path(checkpoint_dir), "talker.code_predictor.")
    weights = [np.asarray(sd[f"lm_head.{j}.weight"], dtype=np.float32) for j in range(n)]
    norm = sd.get("model.norm.weight")
    entries = []
    for p in precisions:
        t0 = time.perf_counter()
        blobs = {step_key(j): np.frombuffer(head_graph(w, bits=8), dtype=np.uint8) for j, w in enumerate(weights)}
        file = HEADS_FILE.format(precision=p)
        # Written into the export's partial bundle folder, which is moved into place only when complete.
        save_file(blobs, str(Path(out_dir) / file), metadata={"format": HEADS_FORMAT, "precision": p, "steps": str(n),
                                                              "block_size": str(BLOCK_SIZE), "bits": "8"})
        heads = QuantizedHeads(Path(out_dir) / file)
        fidelity = measure(heads, weights, norm)
        g = gate("predictor_heads", p)
        failures = g.failures(fidelity, speed=False)
        if failures:
            (Path(out_dir) / file).unlink(missing_ok=True)
            raise HeadsExportError(f"predictor heads {p} fail their gate: {'; '.join(failures)} ({g.why})")
        size = (Path(out_dir) / file).stat().st_size
        say(f"predictor heads {p}: {size / 1e6:.1f} MB (f32 {sum(w.nbytes for w in weights) / 1e6:.1f} MB), logit "
            f"cos min {fidelity['logit_cos_min']:.6f}, top-1 {fidelity['top1']:.4f} "
            f"({time.perf_counter() - t0:.1f} s)")
        done(f"predictor heads {p}")
        entries.append({"role": "predictor_heads", "file": file, "format": HEADS_FORMAT, "precision": p,
                        "engine": "llama.cpp", "num_steps": n, "block_size": BLOCK_SIZE,
                        "accuracy_level": ACCURACY_LEVEL, "fidelity": fidelity, "gate": g.as_dict()})
    return entries
