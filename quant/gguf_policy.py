"""Per-tensor GGUF precision decisions for the llama.cpp talker and code predictor, as data.

One :class:`GGUFPolicy` per (component, precision). Components:

- ``talker``: the upstream-format ``qwen3tts`` GGUF written by the vendored converter (F32) and re-typed with
  ``llama_model_quantize`` (``ftype`` + ``token_embd``/``output`` types + regex ``overrides``; llama.cpp applies
  the overrides to quantized ftypes only).
- ``predictor``: the stock-``qwen3`` code-predictor GGUF. F32/F16/BF16 files are written directly with gguf-py
  (rules applied per tensor); quantized files are ``llama_model_quantize``'d from the F32 file with the rules as
  overrides.
- ``predictor_tables``: host-side tables read with numpy (memmap): 15 input tables, 15 heads, projection.
  numpy has no fast half-precision GEMV, so heads are upcast to F32 at load; storage type only sets size/error.

Rules are (regex over GGUF tensor names, ggml type name, why); first match wins, ``default`` otherwise.
The measurements behind each choice are in ``why`` and MEASUREMENTS (random-weight checkpoints, so they bound
quantization error but cannot show activation outliers of trained weights; where upstream reports one on real
weights, we follow upstream).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

PRECISIONS = ("f32", "f16", "bf16", "q8_0", "q5_k_m", "q4_k_m")
COMPONENTS = ("talker", "predictor", "predictor_tables")


@dataclass(frozen=True)
class TensorRule:
    pattern: str  # regex, searched in the GGUF tensor name
    type: str  # ggml type name: f32, f16, bf16, q8_0, q6_k, ...
    why: str = ""

    def matches(self, name: str) -> bool:
        return re.search(self.pattern, name) is not None


@dataclass(frozen=True)
class GGUFPolicy:
    component: str
    precision: str
    default: str  # type of any 2-D tensor no rule matches (the nominal precision)
    rules: tuple[TensorRule, ...] = ()
    ftype: str | None = None  # llama_model_quantize ftype when the file is re-typed by llama.cpp
    token_embd: str | None = None  # forced token_embd type (llama_model_quantize token_embedding_type)
    output: str | None = None  # forced output type (llama_model_quantize output_tensor_type)
    note: str = ""
    vectors: str = "f32"  # 1-D tensors (norm weights, biases) always stay F32

    def type_for(self, name: str, ndim: int = 2) -> str:
        """Storage type of tensor ``name`` for files written directly (not via llama_model_quantize)."""
        if ndim < 2:
            return self.vectors
        if self.token_embd and name.startswith("token_embd."):
            return self.token_embd
        if self.output and name.startswith("output."):
            return self.output
        for rule in self.rules:
            if rule.matches(name):
                return rule.type
        return self.default

    def overrides(self) -> list[tuple[str, str]]:
        """(regex, type) pairs for llama_model_quantize's tensor-type overrides."""
        return [(r.pattern, r.type) for r in self.rules]

    def table(self) -> dict[str, object]:
        """Plain-data form for manifests and reports."""
        data = asdict(self)
        data["rules"] = [asdict(r) for r in self.rules]
        return data


_WHY_TOKEN_EMBD_F16 = (
    "host-side lookups only (text rows with text_projection folded in, codec rows); llama.cpp never reads it for "
    "embedding input. F16: row rel. error 1.2e-4, talker logits KL 3e-8 from the lookups alone (BF16 1.3e-6, "
    "Q8_0 2.1e-5, Q4_K 4.4e-3 with top-1 0.40: never Q4_K); see MEASUREMENTS['talker_token_embd']"
)
_WHY_TOKEN_EMBD_Q8 = (
    "Q8_0 lookups add KL 2.1e-5 (row rel. error 5.4e-3), <0.3% of the K-quant model's own KL (9.5e-3 / 3.9e-2), "
    "and save 150 MB on 0.6B (the F16 table is 317 MB = 54% of the Q4_K_M file); Q4_K lookups are not acceptable"
)
_WHY_PRED_FFN_DOWN_F16 = (
    "upstream llama.cpp keeps the predictor ffn_down out of F16: on trained weights its input (the SwiGLU "
    "intermediate) peaks near 1.5e5, above the F16 range, and ggml casts mul_mat inputs to the weight type for "
    "F16 weights (inf). Q8_0/K-quant activations carry their own scales, BF16 has the F32 range. Random weights "
    "cannot show it (input absmax 11.3); costs +32 MB (189 vs 157 MB) of predictor traffic per call on 0.6B"
)
_WHY_HEADS = ("15 host-side heads, upcast to F32 at load (numpy GEMV); F16 storage of the bf16-trained heads is "
              "exact (predictor logits identical to F32 tables: KL 9e-13 either way)")
_WHY_TABLES = ("row lookups summed into talker/predictor inputs; raw tables are bf16 in the checkpoint, so F16 "
               "storage is exact; folded (projected) tables round once, well below the predictor's own error")

_K_MIX = ("llama.cpp's K-quant mix, kept as is: output Q6_K, attn_v + ffn_down Q6_K in 15 of 28 talker layers "
          "(2 of 5 predictor layers)")
_TALKER_NOTE = "qwen3tts GGUF (upstream layout); host-lookup token_embd typed separately (see why)"

_POLICIES: list[GGUFPolicy] = [
    # --- talker ---------------------------------------------------------------------------------------------
    GGUFPolicy("talker", "f32", "f32", note="reference/parity only; exactly what the vendored converter writes"),
    GGUFPolicy("talker", "f16", "f16", ftype="f16", token_embd="f16", note=f"{_TALKER_NOTE}. {_WHY_TOKEN_EMBD_F16}"),
    GGUFPolicy("talker", "bf16", "bf16", ftype="bf16", token_embd="f16",
               note=f"{_TALKER_NOTE}. {_WHY_TOKEN_EMBD_F16}"),
    GGUFPolicy("talker", "q8_0", "q8_0", ftype="q8_0", token_embd="f16",
               note=f"{_TALKER_NOTE}. {_WHY_TOKEN_EMBD_F16}; Q8_0 lookups would add 5% to this variant's KL"),
    GGUFPolicy("talker", "q5_k_m", "q5_k", ftype="q5_k_m", token_embd="q8_0",
               note=f"{_TALKER_NOTE}. {_WHY_TOKEN_EMBD_Q8}. {_K_MIX}"),
    GGUFPolicy("talker", "q4_k_m", "q4_k", ftype="q4_k_m", token_embd="q8_0",
               note=f"{_TALKER_NOTE}. {_WHY_TOKEN_EMBD_Q8}. {_K_MIX}"),
    # --- code predictor (stock qwen3) -------------------------------------------------------------------------
    GGUFPolicy("predictor", "f32", "f32", note="reference/parity only"),
    GGUFPolicy("predictor", "f16", "f16", rules=(TensorRule(r"ffn_down\.weight$", "f32", _WHY_PRED_FFN_DOWN_F16),)),
    GGUFPolicy("predictor", "bf16", "bf16"),
    GGUFPolicy("predictor", "q8_0", "q8_0", ftype="q8_0"),
    GGUFPolicy("predictor", "q5_k_m", "q5_k", ftype="q5_k_m", note=_K_MIX),
    GGUFPolicy("predictor", "q4_k_m", "q4_k", ftype="q4_k_m", note=_K_MIX),
    # --- host-side predictor tables ---------------------------------------------------------------------------
    GGUFPolicy("predictor_tables", "f32", "f32", note="reference/parity only"),
    *[
        GGUFPolicy("predictor_tables", p, "f16",
                   rules=(TensorRule(r"^lm_head\.", "f16", _WHY_HEADS),
                          TensorRule(r"codec_embd", "f16", _WHY_TABLES),
                          TensorRule(r"^proj\.weight$", "f32", "projection applied at runtime to the 2 prefill "
                                                                  "vectors; tiny, keep exact")),
                   note="numpy-side; quantized llama precisions still use F16 host tables")
        for p in PRECISIONS[1:]
    ],
]

POLICIES: dict[tuple[str, str], GGUFPolicy] = {(p.component, p.precision): p for p in _POLICIES}

# Measurements behind the rules: random:0.6b-custom_voice (seed 0), bench/parity_llama.py trajectory (19-position
# CustomVoice prompt + 24 teacher-forced frames, 6 predictor frames x 15 steps), 2-core CPU, vs official fp32 torch.
MEASUREMENTS: dict[str, dict[str, object]] = {
    "talker_token_embd": {  # token_embd stored at TYPE, everything else F32: rows vs F32 rows, logits vs F32 run
        "F16": {"row_rel_err": 1.2e-4, "logits_kl": 3.3e-8, "logits_cos": 0.99999997, "top1": 1.00},
        "BF16": {"row_rel_err": 9.3e-4, "logits_kl": 1.3e-6, "logits_cos": 0.9999986, "top1": 1.00},
        "Q8_0": {"row_rel_err": 5.4e-3, "logits_kl": 2.1e-5, "logits_cos": 0.99998, "top1": 0.96},
        "Q4_K": {"row_rel_err": 7.2e-2, "logits_kl": 4.4e-3, "logits_cos": 0.9958, "top1": 0.40},
    },
    "talker": {  # whole variant vs official torch (mean over 25 positions)
        "f16": {"logit_cos": 0.9999994, "kl": 6e-7, "top1": 1.00},
        "bf16": {"logit_cos": 0.9999888, "kl": 1.1e-5, "top1": 1.00},
        "q8_0": {"logit_cos": 0.99960, "kl": 3.9e-4, "top1": 0.80},
        "q5_k_m": {"logit_cos": 0.9907, "kl": 9.5e-3, "top1": 0.68},
        "q4_k_m": {"logit_cos": 0.9629, "kl": 3.9e-2, "top1": 0.40},
    },
    "predictor": {  # whole variant (GGUF + tables) vs official torch (90 steps)
        "f16": {"logit_cos": 0.9999994, "kl": 6e-7, "top1": 0.99},
        "bf16": {"logit_cos": 0.9999822, "kl": 1.8e-5, "top1": 1.00},
        "q8_0": {"logit_cos": 0.99958, "kl": 4.2e-4, "top1": 0.94},
        "q5_k_m": {"logit_cos": 0.9905, "kl": 9.6e-3, "top1": 0.74},
        "q4_k_m": {"logit_cos": 0.9644, "kl": 3.6e-2, "top1": 0.61},
    },
    "predictor_tables": {"f16_vs_f32_tables_kl": 9.1e-13},  # F16 storage of bf16 tables/heads is exact
    "1.7b": {  # random:1.7b-custom_voice, same trajectory; predictor uses folded (projected) F16 tables
        "talker": {"f16": {"logit_cos": 0.9999994, "kl": 6e-7}, "q8_0": {"logit_cos": 0.99957, "kl": 4.5e-4},
                   "q4_k_m": {"logit_cos": 0.9634, "kl": 3.9e-2}},
        "predictor": {"f16": {"logit_cos": 0.9999996, "kl": 4e-7}, "q8_0": {"logit_cos": 0.99972, "kl": 2.8e-4},
                      "q4_k_m": {"logit_cos": 0.9721, "kl": 2.8e-2}},
    },
    "ffn_down_input_absmax": {  # random weights only: far below F16's 65504; upstream saw ~1.5e5 on trained weights
        "talker": 12.7, "predictor": 11.3,
    },
}


def policy(component: str, precision: str) -> GGUFPolicy:
    """The policy for ``component`` at ``precision``, with a clear error for unknown pairs."""
    try:
        return POLICIES[(component, precision)]
    except KeyError:
        raise ValueError(f"no GGUF policy for {component!r} at {precision!r}; precisions: {', '.join(PRECISIONS)}, "
                         f"components: {', '.join(COMPONENTS)}") from None
