"""Decoder precision variants derived from the fp32 graph: fp16 surgery and calibrated int8 (static QDQ).

Which nodes stay fp32 comes from ``quant.onnx_policy``; the variants are gated by ``quant.gates`` in
``decoder_onnx.export_decoder`` before they ship.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..quant import onnx_policy as policies

CALIBRATION_CHUNK = 4  # frames per calibration call


def open_runtime_decoder(model_path: Path, providers: Sequence[str] | None = ("CPUExecutionProvider",),
             threads: int | None = None) -> Any:
    """The runtime decoder, minus its "fp16 on CPU" advice (export measures fp16 on CPU on purpose)."""
    from ..runtime.backends.onnxruntime.decoder import StreamingDecoder

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "the fp16 decoder is meant for GPU", RuntimeWarning)
        return StreamingDecoder(model_path, providers=providers, threads=threads)


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
        self._dec = open_runtime_decoder(fp32_path)
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
    """int8 on the policy's nodes, in two passes over the fp32 graph.

    ``int8`` nodes (convs): static QDQ, per-channel symmetric int8 weights, uint8 activations with
    99.999th-percentile ranges. Calibration streams the real state, so carried contexts are in range too.
    ``int8_dynamic`` nodes (linear layers, constant weights only): per-channel int8 weights, activations
    quantised per call from their own range (onnxruntime ``DynamicQuantizeMatMul``); no calibration.

    Percentile ranges beat min/max ranges and a larger calibration set did not help (bench/README, "Numbers
    behind code choices"); onnxruntime fuses the QDQ pairs into QLinearConv. Dynamic int8 on the
    transformer/ConvNeXt linears costs next to no SNR and cuts their fp32 weight traffic to a quarter (see
    the policy notes).
    """
    import tempfile

    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static

    model = onnx.load(str(fp32_path), load_external_data=False)
    assigned = precision_map(model, "int8")
    nodes = assigned.get("int8", [])
    if not nodes:
        raise ValueError("int8 policy selects no nodes")
    dynamic = set(assigned.get("int8_dynamic", []))
    if dynamic:  # only products with a constant weight can be quantised ahead; the rest stay fp32
        constant = {t.name for t in model.graph.initializer}
        weighted = {n.name for n in model.graph.node if n.name in dynamic and n.op_type == "MatMul"
                    and len(n.input) > 1 and n.input[1] in constant}
        assigned["fp32"] = assigned.get("fp32", []) + sorted(dynamic - weighted)
        assigned["int8_dynamic"] = [n for n in assigned["int8_dynamic"] if n in weighted]
        if not assigned["int8_dynamic"]:
            del assigned["int8_dynamic"]
        dynamic = weighted
    by_name = {n.name: n.op_type for n in model.graph.node}
    del model
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # onnxruntime advises "pre-processing" and prints calibration chatter
    try:
        with contextlib.redirect_stdout(io.StringIO()), tempfile.TemporaryDirectory(dir=Path(path).parent) as tmp:
            static_path = Path(tmp) / "static.onnx" if dynamic else Path(path)
            quantize_static(
                str(fp32_path), str(static_path), _CalibrationReader(fp32_path, sequences, chunk),
                quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, nodes_to_quantize=nodes,
                op_types_to_quantize=sorted({by_name[n] for n in nodes}),
                calibrate_method=CalibrationMethod.Percentile,
                extra_options={"CalibPercentile": 99.999},
            )
            if dynamic:
                quantize_dynamic(
                    str(static_path), str(path), op_types_to_quantize=["MatMul"], nodes_to_quantize=sorted(dynamic),
                    per_channel=True, weight_type=QuantType.QInt8, extra_options={"MatMulConstBOnly": True},
                )
    finally:
        root.setLevel(level)
    return {k: len(v) for k, v in assigned.items()}
