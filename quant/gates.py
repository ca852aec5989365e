"""Fidelity (and speed) gates a precision variant must pass before it ships, as data.

Metrics are those of ``quant.metrics`` (``snr_db``, ``logmel_dist`` in dB, ``max_abs``, cosines); the
reference is named per gate. A derived variant that fails is not shipped and the reason is recorded in the
manifest; an fp32 graph that fails is an export bug and stops the export. Rows: the codec decoder
(``export/decoder_onnx.py``), the ONNX talker / fused predictor graphs (``export/talker_onnx.py``,
``predictor_onnx.py``, ``generation_onnx.py``) and the speaker encoder (``speaker_encoder_onnx.py``). The
GGUF variants have no gate: their logit cosine / KL against the F32 files is measured and recorded at export
(``export/llama_gguf.self_check``), never refused.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Gate:
    component: str
    precision: str
    reference: str  # what the metrics are measured against
    max_abs: float | None = None
    min_snr_db: float | None = None
    max_logmel_dist: float | None = None
    min_cpu_speedup: float | None = None  # vs the fp32 graph on the CPU provider, same threads
    min_logit_cos: float | None = None  # worst position's / step's logit cosine (``logit_cos_min``)
    max_hidden_rel: float | None = None  # max |Δ hidden| / max(1, max |hidden|) (``hidden_rel_max_abs``)
    min_cosine: float | None = None  # worst output vector's cosine (``cosine_min``)
    max_output_abs: float | None = None  # max |Δ| of the graph's output (``max_abs``)
    why: str = ""

    def failures(self, metrics: dict[str, Any], speed: bool = True) -> list[str]:
        """Human-readable reasons the metrics fail this gate (empty: pass). A missing metric fails;
        ``speed=False`` checks fidelity only (parity reports do not time anything)."""
        checks = [
            ("stream_vs_offline_max_abs", self.max_abs, "<=", "{:.3g}"),
            ("snr_db", self.min_snr_db, ">=", "{:.1f} dB"),
            ("logmel_dist", self.max_logmel_dist, "<=", "{:.3f} dB"),
            ("logit_cos_min", self.min_logit_cos, ">=", "{:.7g}"),
            ("hidden_rel_max_abs", self.max_hidden_rel, "<=", "{:.3g}"),
            ("cosine_min", self.min_cosine, ">=", "{:.7g}"),
            ("max_abs", self.max_output_abs, "<=", "{:.3g}"),
        ]
        if speed:
            checks.append(("cpu_speedup", self.min_cpu_speedup, ">=", "{:.2f}x"))
        reasons = []
        for key, limit, op, fmt in checks:
            if limit is None:
                continue
            value = metrics.get(key)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                reasons.append(f"{key} not measured")
                continue
            ok = value <= limit if op == "<=" else value >= limit
            if not ok:
                bad = "<" if op == ">=" else ">"
                reasons.append(f"{key} {fmt.format(value)} {bad} {fmt.format(limit)} gate")
        return reasons

    def as_dict(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if v is not None}


GATES: dict[tuple[str, str], Gate] = {
    ("decoder", "fp32"): Gate(
        "decoder", "fp32", reference="official offline forward of the whole sequence (torch fp32)",
        max_abs=1e-4,
        why="the stateful graph is mathematically the offline decoder; anything above float rounding "
            "(measured 1e-6..1e-5) is a state bug",
    ),
    ("decoder", "fp16"): Gate(
        "decoder", "fp16", reference="fp32 streaming ONNX decode of the same codes",
        min_snr_db=40.0, max_logmel_dist=0.25,
        why="fp16 of the conv stack should cost rounding-level error only (measured 52.8 dB / 0.008 dB tiny, "
            "54.2 dB / 0.007 dB at the 0.6b shape); the gate sits >10 dB and >30x below that, so it passes "
            "real-weight variation but rejects structural fp16 failures (overflow, saturation, drift)",
    ),
    ("decoder", "int8"): Gate(
        "decoder", "int8", reference="fp32 streaming ONNX decode of the same codes",
        min_snr_db=25.0, max_logmel_dist=1.0, min_cpu_speedup=1.2,
        why="int8 exists only to buy CPU speed (dynamic int8 measured 2.5x slower at 21.5 dB, rejected): it "
            "must cut CPU time by >=1.2x at 4- and 12-frame chunks. 25 dB SNR keeps the quantisation noise "
            "floor 25 dB under the signal and rejects that dynamic-int8 result; static QDQ measured 30.2 dB "
            "/ 0.105 dB log-mel at the 0.6b shape. Random weights: re-check with the real checkpoint",
    ),
    # --- ONNX Runtime generation graphs (talker with explicit KV cache, fused 15-step predictor) ------------
    ("talker", "fp32"): Gate(
        "talker", "fp32", reference="official talker (torch fp32) along a prompt + single steps",
        min_logit_cos=0.99999, max_hidden_rel=1e-4,
        why="the graph is the official module traced in fp32; anything beyond float rounding is an export bug",
    ),
    ("predictor", "fp32"): Gate(
        "predictor", "fp32", reference="official code predictor (torch fp32), greedy frames",
        min_logit_cos=0.99999,
        why="the fused graph is the official module traced in fp32; anything beyond float rounding is an export "
            "bug (its greedy codes must also equal the official ones on every frame: predictor_onnx checks that)",
    ),
    ("talker", "int8"): Gate(
        "talker", "int8", reference="official talker (torch fp32) along a prompt + single steps",
        min_logit_cos=0.999,
        why="weight-only int8 should cost what llama.cpp's q8_0 does (random 0.6B CustomVoice, issue #14: "
            "0.99961, q8_0 0.99955); the gate allows ~2.5x that error (1 - cosine)",
    ),
    ("predictor", "int8"): Gate(
        "predictor", "int8", reference="official code predictor (torch fp32), teacher-forced on its greedy codes",
        min_logit_cos=0.999,
        why="weight-only int8 should cost what llama.cpp's q8_0 does (random 0.6B CustomVoice, issue #14: "
            "0.99932, q8_0 0.99937); the gate allows ~1.5x that error (1 - cosine)",
    ),
    ("talker", "int4"): Gate(
        "talker", "int4", reference="official talker (torch fp32) along a prompt + single steps",
        min_logit_cos=0.93,
        why="int4 (v_proj / down_proj at int8) should be on par with llama.cpp's q4_k_m (random 0.6B "
            "CustomVoice, issue #14: 0.960, q4_k_m 0.963); the gate allows ~1.8x that error (1 - cosine)",
    ),
    ("predictor", "int4"): Gate(
        "predictor", "int4", reference="official code predictor (torch fp32), teacher-forced on its greedy codes",
        min_logit_cos=0.92,
        why="int4 (v_proj / down_proj at int8) should be on par with llama.cpp's q4_k_m (random 0.6B "
            "CustomVoice, issue #14: 0.945, q4_k_m 0.948); the gate allows ~1.5x that error (1 - cosine)",
    ),
    # --- the llama.cpp predictor's output heads (export/predictor_heads.py) -----------------------------------
    ("predictor_heads", "int8"): Gate(
        "predictor_heads", "int8", reference="the float32 heads on predictor-shaped hidden states",
        min_logit_cos=0.9995,
        why="blockwise int8 (32) of a plain GEMV should cost rounding-level error only (random 0.6B CustomVoice: "
            "cosine 0.99997 per logit vector); the gate allows ~15x that error (1 - cosine), far under what "
            "q8_0 costs the predictor's layers (0.9994)",
    ),
    # --- voice encoders -------------------------------------------------------------------------------------
    ("speaker_encoder", "fp32"): Gate(
        "speaker_encoder", "fp32", reference="official speaker encoder (torch fp32) on the same log-mel input",
        min_cosine=0.99999, max_output_abs=1e-4,
        why="the graph is the official module traced in fp32; anything beyond float rounding is an export bug",
    ),
}


def gate(component: str, precision: str) -> Gate:
    try:
        return GATES[(component, precision)]
    except KeyError:
        raise KeyError(f"no fidelity gate for {component}/{precision}") from None
