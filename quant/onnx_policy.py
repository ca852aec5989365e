"""Precision policies as data: which ops of which component stay in which precision.

Each policy is an ordered rule table (first match wins) over (scope, op type). For the codec decoder the
scope is the module path that the ONNX exporter records per node (``StatefulDecoder`` submodules:
``dequant``, ``pre_conv``, ``transformer…``, ``upsample.i…``, ``in_conv``, ``blocks.i…``,
``head_…``; "" is top-level glue). The GGUF side can add its own components (e.g. ("talker", "q8_0"))
to ``POLICIES`` with tensor-name scopes; nothing here depends on onnx or torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase

PRECISIONS = ("fp32", "fp16", "bf16", "int8", "q8_0", "q4_k")


@dataclass(frozen=True)
class OpRule:
    scope: str  # fnmatch pattern over the node/tensor scope
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
                   "+ ConvNeXt/in_conv 19.7 dB. Blocks 0-2 cause most of the error (block 3 alone 36.8 dB)")
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
    ),
    default="fp32",
    providers=("CPUExecutionProvider",),
    note="static QDQ int8 (per-channel symmetric weights, calibrated activations) on the heavy conv blocks "
         "only; everything else, including RVQ, norms, SnakeBeta and the head, stays fp32",
)

DECODER_FP32 = PrecisionPolicy(
    component="decoder", precision="fp32", rules=(), default="fp32",
    providers=("CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"),
    note="reference graph: equal to the official offline decode",
)

POLICIES: dict[tuple[str, str], PrecisionPolicy] = {
    ("decoder", "fp32"): DECODER_FP32,
    ("decoder", "fp16"): DECODER_FP16,
    ("decoder", "int8"): DECODER_INT8,
}


def policy(component: str, precision: str) -> PrecisionPolicy:
    try:
        return POLICIES[(component, precision)]
    except KeyError:
        known = ", ".join(f"{c}/{p}" for c, p in POLICIES)
        raise KeyError(f"no precision policy for {component}/{precision} (known: {known})") from None
