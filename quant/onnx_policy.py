"""Precision policies as data: which ops of which component stay in which precision.

Each policy is an ordered rule table (first match wins) over (scope, op type). For the codec decoder the
scope is the module path that the ONNX exporter records per node (``StatefulDecoder`` submodules:
``dequant``, ``pre_conv``, ``transformer…``, ``upsample.i…``, ``in_conv``, ``blocks.i…``,
``head_…``; "" is top-level glue). For the ONNX talker and fused predictor graphs it is the exporter's node
name (see ``_generation_policy``). The GGUF precisions of the llama.cpp engines are ``quant.gguf_policy``.
Nothing here depends on onnx or torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase


@dataclass(frozen=True)
class OpRule:
    scope: str  # fnmatch pattern over the node/tensor scope
    # fp32, fp16, int8 (static: calibrated activation ranges), int8_dynamic (int8 weights, activation range
    # taken per call) or int4 (weight-only)
    precision: str
    ops: tuple[str, ...] = ("*",)  # op-type patterns the rule applies to
    why: str = ""

    def matches(self, scope: str, op_type: str) -> bool:
        return fnmatchcase(scope, self.scope) and any(fnmatchcase(op_type, o) for o in self.ops)


@dataclass(frozen=True)
class PrecisionPolicy:
    component: str
    precision: str  # the variant's nominal precision
    rules: tuple[OpRule, ...]
    default: str  # precision of anything no rule matches
    providers: tuple[str, ...]  # execution providers the variant is meant for
    note: str = ""

    def precision_for(self, scope: str, op_type: str) -> str:
        for rule in self.rules:
            if rule.matches(scope, op_type):
                return rule.precision
        return self.default

    def table(self) -> list[dict[str, object]]:
        """The rule table as plain rows (for manifests and reports)."""
        rows = [dict(asdict(r), ops=list(r.ops)) for r in self.rules]
        return rows + [{"scope": "*", "precision": self.default, "ops": ["*"], "why": "default"}]


_WHY_RVQ = "codebook vectors and their projections: mantissa truncation shifts every frame"
_WHY_TRANSFORMER = ("pre_transformer is ~1% of the FLOPs (0.06 of 4.96 GFLOP/frame) and holds RMSNorm, "
                    "softmax, RoPE and the SwiGLU product that overflowed fp16 in a third-party graph")
_WHY_NORM = "normalisation statistics (mean/variance over 1024 channels) lose precision in fp16"
_WHY_HEAD = "final SnakeBeta + 96→1 conv write the waveform directly; errors here are audible as-is"
_WHY_INT8_CONV1 = ("the dilated k7 residual convs of the four upsampling blocks carry most of the FLOPs. "
                   "Measured at the 0.6b shape (min/max ranges, SNR vs fp32): these alone 29.3 dB at "
                   "1.66x less CPU; + the k1 convs 26.9 dB, no faster; + transposed convs 22.2 dB; "
                   "+ ConvNeXt/in_conv 19.7 dB. Blocks 0-2 cause most of the error (block 3 alone 36.8 dB). "
                   "Percentile ranges (issue #13, each group alone, SNR vs fp32): conv1 30.1 dB; k1 conv2 "
                   "31.5 dB but no faster (1.01x: Q/DQ of the wide activations eats the gain); all tconvs "
                   "24.8 dB; in_conv 27.6 dB; in_conv+upsample convs 23.2 dB; every conv 20.2 dB")
_WHY_INT8_TCONV23 = ("the transposed convs of blocks 2-3 (fp32: ~6% of int8 time). Percentile ranges, each alone: "
                     "tconv0 28.7 dB, tconv1 30.1, tconv2 32.2, tconv3 34.3 dB; errors add as noise powers. With "
                     "conv1 + dynamic linears (issue #13, 1 thread, interleaved, 3 runs, median ratio vs fp32 "
                     "mixed 1/2/4/8-frame chunks | 4-frame chunks): + tconv2+3 27.1 dB, 2.15x | 2.16x; + tconv0 "
                     "26.3 dB, 2.06x | 1.98x (214 MB); + tconv0+3 25.7 dB (too close to the gate); conv1 + "
                     "linears only 30.1 dB, ~1.9x; the previous conv1-only graph ~1.6x")
_WHY_INT8_DYN = ("the transformer and ConvNeXt pointwise linears are ~1% of the FLOPs but stream 184 MB of fp32 "
                 "weights per call (chunks of 1-8 frames make them GEMVs): 19% of int8 time in the profile. "
                 "Dynamic int8 (per-channel weights, per-call activation range, DynamicQuantizeMatMul) costs "
                 "< 0.1 dB (30.12 -> 30.08 dB on top of conv1) and is 1.15-1.35x faster overall; weight-only "
                 "MatMulNBits 8-bit was slower (fp32 compute) or worse (27.8 dB, int8 compute)")
_WHY_GLUE = "top-level glue (clamp, reshape, position counter) is free in any precision"

DECODER_FP16 = PrecisionPolicy(
    component="decoder",
    precision="fp16",
    rules=(
        OpRule("dequant*", "fp32", why=_WHY_RVQ),
        OpRule("transformer*", "fp32", why=_WHY_TRANSFORMER),
        OpRule("*.norm", "fp32", why=_WHY_NORM),
        OpRule("head_*", "fp32", why=_WHY_HEAD),
        OpRule("", "fp32", why=_WHY_GLUE),
    ),
    default="fp16",
    providers=("CUDAExecutionProvider", "TensorrtExecutionProvider", "DmlExecutionProvider"),
    note="fp16 conv/upsample stack for GPU providers; onnxruntime's CPU provider has little native fp16 "
         "compute and inserts casts, so on CPU this graph is not faster than fp32",
)

DECODER_INT8 = PrecisionPolicy(
    component="decoder",
    precision="int8",
    rules=(
        OpRule("blocks.*.res.*.conv1.conv", "int8", ops=("Conv",), why=_WHY_INT8_CONV1),
        OpRule("blocks.[23].tconv.conv", "int8", ops=("Conv",), why=_WHY_INT8_TCONV23),
        OpRule("transformer.layers.*", "int8_dynamic", ops=("MatMul",), why=_WHY_INT8_DYN),
        OpRule("upsample.*.pwconv*", "int8_dynamic", ops=("MatMul",), why=_WHY_INT8_DYN),
    ),
    default="fp32",
    providers=("CPUExecutionProvider",),
    note="static QDQ int8 (per-channel symmetric weights, percentile-calibrated activations) on the dilated "
         "residual convs and the transposed convs of blocks 2-3, dynamic int8 on the transformer/ConvNeXt linears; "
         "everything else, including RVQ, norms, SnakeBeta, the other convs and the head, stays fp32",
)

DECODER_FP32 = PrecisionPolicy(
    component="decoder", precision="fp32", rules=(), default="fp32",
    providers=("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"),
    note="reference graph: equal to the official offline decode",
)

_WHY_GEN_LAYERS = ("talker / predictor decoder-layer linears: one position per call makes them GEMVs that stream "
                   "every weight (the fused predictor reads its 5 layers 15x per frame), so bytes are the cost. "
                   "Blockwise weight-only MatMulNBits, block 32, symmetric, accuracy_level 4 (int8 dot products; "
                   "level 0 = fp32 compute was 13x slower). 0.6b shape, random weights, vs official fp32 (issue "
                   "#14): int8 talker logit cos 0.9996 / KL 3.6e-4, predictor 0.9993 / 4.1e-4 (llama.cpp q8_0: "
                   "0.9995 / 4.1e-4, 0.9994 / 4.2e-4); fp32 compute at level 0 is barely better (0.9997)")
_WHY_GEN_INT4_KEEP8 = ("v_proj and down_proj are the int4-sensitive linears (q4_k_m keeps them at 6 bits): at the "
                       "0.6b shape all-int4 gave talker cos 0.911 / KL 0.088, predictor 0.922 / 0.054; with these "
                       "at int8 0.960 / 0.038 and 0.945 / 0.034, on par with q4_k_m (0.963 / 0.037, 0.948 / "
                       "0.035), for +20% talker file size; asymmetric int4 did not help (0.915)")
_WHY_GEN_HEADS = ("the codec head / 15 predictor heads write the logits that are sampled directly: kept fp32. "
                  "They are < 1% of the talker's weights but 126 MB of the predictor's per-frame stream: "
                  "quantising them made the int4 predictor ~15% faster (fidelity not yet measured)")


def _generation_policy(component: str, precision: str, note: str) -> PrecisionPolicy:
    """Weight-only policy of the ONNX talker / fused predictor (scopes: exporter node names, e.g.
    ``layers.3/mlp/up_proj_7``, ``heads.4``, ``head``; only MatMul weights are quantised)."""
    keep8 = () if precision != "int4" else (
        OpRule("layers.*/self_attn/v_proj*", "int8", ops=("MatMul",), why=_WHY_GEN_INT4_KEEP8),
        OpRule("layers.*/mlp/down_proj*", "int8", ops=("MatMul",), why=_WHY_GEN_INT4_KEEP8),
    )
    return PrecisionPolicy(
        component=component,
        precision=precision,
        rules=keep8 + (
            OpRule("head", "fp32", ops=("MatMul",), why=_WHY_GEN_HEADS),
            OpRule("heads.*", "fp32", ops=("MatMul",), why=_WHY_GEN_HEADS),
            OpRule("layers.*", precision, ops=("MatMul",), why=_WHY_GEN_LAYERS),
            OpRule("proj*", precision, ops=("MatMul",), why=_WHY_GEN_LAYERS),
        ),
        default="fp32",
        providers=("CPUExecutionProvider",),
        note=note,
    )


_NOTE_GEN = ("weight-only {p} MatMulNBits on the decoder-layer linears{extra}; norms, RoPE, attention, embedding "
             "Gathers, heads and sampling stay fp32 (export/generation_quant.py)")
_NOTE_INT4 = _NOTE_GEN.format(p="int4", extra=" (v_proj, down_proj int8)")
TALKER_INT8 = _generation_policy("talker", "int8", _NOTE_GEN.format(p="int8", extra=""))
TALKER_INT4 = _generation_policy("talker", "int4", _NOTE_INT4)
PREDICTOR_INT8 = _generation_policy("predictor", "int8", _NOTE_GEN.format(p="int8", extra=""))
PREDICTOR_INT4 = _generation_policy("predictor", "int4", _NOTE_INT4)

POLICIES: dict[tuple[str, str], PrecisionPolicy] = {
    ("decoder", "fp32"): DECODER_FP32,
    ("decoder", "fp16"): DECODER_FP16,
    ("decoder", "int8"): DECODER_INT8,
    ("talker", "int8"): TALKER_INT8,
    ("talker", "int4"): TALKER_INT4,
    ("predictor", "int8"): PREDICTOR_INT8,
    ("predictor", "int4"): PREDICTOR_INT4,
}


def policy(component: str, precision: str) -> PrecisionPolicy:
    try:
        return POLICIES[(component, precision)]
    except KeyError:
        known = ", ".join(f"{c}/{p}" for c, p in POLICIES)
        raise KeyError(f"no precision policy for {component}/{precision} (known: {known})") from None
