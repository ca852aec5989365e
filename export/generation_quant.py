"""Weight-only int8 / int4 variants of the ONNX talker and fused predictor graphs (MatMulNBits).

Both graphs are memory-bound GEMVs at generation time (one position per talker step, one per predictor step),
so what costs is streaming fp32 weights: the fused predictor reads its 5 layers 15 times per frame. Blockwise
weight-only quantisation (onnxruntime's ``MatMulNBitsQuantizer``) cuts those bytes (int8, or int4 whose policy
keeps the sensitive v_proj / down_proj at int8, one quantizer pass per bit width); ``accuracy_level`` 4 lets
the CPU kernel quantise the activation per block and run int8 dot products, where level 0 (fp32 compute) is
far slower on the fused predictor (bench/README, "Numbers behind code choices").

Which MatMuls are quantised comes from ``quant.onnx_policy`` (components ``talker`` / ``predictor``); the
scope of a node is its exporter name without the leading ``/`` and the trailing op (``layers.3/mlp/up_proj_7``,
``heads.4``, ``head``). Embedding Gathers stay fp32: they read one row per step (no bandwidth to save) and
onnxruntime's ``GatherBlockQuantized`` is 4-bit only.

The fused predictor reuses each layer weight in all 15 unrolled steps (the exporter feeds the later steps
through ``Identity`` nodes). The quantizer handles one MatMul at a time and would store a quantised copy per
use, so each weight is quantised once, at its first MatMul, and the other uses are rewritten to read the same
quantised initializers.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import time
from pathlib import Path
from typing import Any

from ..quant import onnx_policy as policies
from .talker_onnx import EXTERNAL_DATA_BYTES, METADATA_KEY

BITS = {"int8": 8, "int4": 4}
GRAPHS = ("talker", "predictor")
BLOCK_SIZE = 32  # measured at the 0.6b shape (issue #14); smaller blocks = finer scales, barely slower
ACCURACY_LEVEL = 4  # int8 activations in the CPU kernel (VNNI/AVX2 dot products); 0 = fp32 compute


class GenerationQuantError(ValueError):
    """A graph or precision this quantiser does not handle."""


def quantized_file_name(fp32_name: str, precision: str) -> str:
    """``talker.fp32.onnx`` -> ``talker.int8.onnx`` (the naming the bundle uses for precision variants)."""
    if ".fp32." not in fp32_name:
        raise GenerationQuantError(f"{fp32_name}: expected an fp32 graph name like 'talker.fp32.onnx'")
    return fp32_name.replace(".fp32.", f".{precision}.")


def node_scope(node: Any) -> str:
    """``/layers.0/mlp/up_proj_3/MatMul`` -> ``layers.0/mlp/up_proj_3`` (the policy's scope)."""
    name = node.name.strip("/")
    return name.rsplit("/", 1)[0] if "/" in name else ""


def _graph_meta(model: Any, path: Path) -> dict[str, Any]:
    raw = next((p.value for p in model.metadata_props if p.key == METADATA_KEY), None)
    if raw is None:
        raise GenerationQuantError(f"{path.name} is not a qwen3-tts-edge generation graph (no {METADATA_KEY!r} "
                                   "metadata); only the talker and predictor graphs can be quantised here")
    meta = json.loads(raw)
    if meta.get("graph") not in GRAPHS:
        raise GenerationQuantError(f"{path.name} is a {meta.get('graph')!r} graph; expected one of {GRAPHS}")
    if meta.get("precision", "fp32") != "fp32":
        raise GenerationQuantError(f"{path.name} is already {meta['precision']}; quantise the fp32 graph")
    return meta


def _inline_weight_identities(graph: Any, inits: set[str]) -> int:
    """Point readers of ``Identity(initializer)`` at the initializer itself; drop those Identities."""
    alias = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "Identity" and n.input[0] in inits}
    alias = {k: v for k, v in alias.items() if k not in {o.name for o in graph.output}}
    if not alias:
        return 0
    keep = [n for n in graph.node if not (n.op_type == "Identity" and n.output[0] in alias)]
    for n in keep:
        for i, name in enumerate(n.input):
            if name in alias:
                n.input[i] = alias[name]
    graph.ClearField("node")
    graph.node.extend(keep)
    return len(alias)


def _save(model: Any, out_path: Path) -> list[str]:
    """Save like ``talker_onnx.export_graph``: weights inline, or in one ``<name>.data`` when big."""
    import onnx

    data = out_path.with_name(out_path.name + ".data")
    data.unlink(missing_ok=True)
    if model.ByteSize() > EXTERNAL_DATA_BYTES:
        onnx.save(model, str(out_path), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=data.name, size_threshold=1024)
        return [out_path.name, data.name]
    onnx.save(model, str(out_path))
    return [out_path.name]


def _quantize_pass(model: Any, leaders: dict[str, str], followers: dict[str, str], bits: int, *,
                   block_size: int, accuracy_level: int, is_symmetric: bool) -> Any:
    """Quantise the ``leaders`` (weight -> node) MatMuls at ``bits``; point ``followers`` at their leader's
    quantised initializers. Every other MatMul is excluded from the pass."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    lead_nodes = set(leaders.values())
    exclude = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.name not in lead_nodes]
    quant_logger = logging.getLogger("onnxruntime.quantization")
    level = quant_logger.level
    quant_logger.setLevel(logging.WARNING)  # it logs one INFO line per node
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            q = MatMulNBitsQuantizer(model, bits=bits, block_size=block_size, is_symmetric=is_symmetric,
                                     accuracy_level=accuracy_level, nodes_to_exclude=exclude,
                                     op_types_to_quantize=("MatMul",))
            q.process()
    finally:
        quant_logger.setLevel(level)
    model = q.model.model
    graph = model.graph
    by_name = {n.name: n for n in graph.node}
    suffix = f"_Q{bits}"
    quantised = {}
    for w, leader in leaders.items():
        qnode = by_name.get(leader + suffix)
        if qnode is None or qnode.op_type != "MatMulNBits":
            raise RuntimeError(f"the quantizer left {leader} ({w}) unquantised")
        quantised[w] = qnode
    nodes = []
    for node in graph.node:
        w = followers.get(node.name)
        if w is None:
            nodes.append(node)
            continue
        lead = quantised[w]
        new = onnx.helper.make_node("MatMulNBits", [node.input[0], *lead.input[1:]], list(node.output),
                                    name=node.name + suffix, domain="com.microsoft")
        new.attribute.extend(lead.attribute)
        nodes.append(new)
    graph.ClearField("node")
    graph.node.extend(nodes)
    return model


def quantize_generation_graph(fp32_path: Path | str, out_path: Path | str, precision: str, *,
                              block_size: int = BLOCK_SIZE, accuracy_level: int = ACCURACY_LEVEL,
                              is_symmetric: bool = True, policy: policies.PrecisionPolicy | None = None
                              ) -> dict[str, Any]:
    """Write the ``precision`` (``int8`` / ``int4``) variant of a talker or predictor fp32 graph; return meta.

    ``out_path`` gets the graph and, when it is big, one ``<name>.data`` beside it (listed in ``files``).
    ``policy`` overrides the ``quant.onnx_policy`` table for this graph (experiments, e.g. quantised heads).

    The graph keeps its metadata record (plus ``precision`` and ``quantization``), so the ONNX engines load it
    unchanged. Returned: the graph kind, files written, MatMul counts per precision, distinct weights
    quantised, block size, accuracy level, symmetry and the policy table.
    """
    import numpy as np
    import onnx

    if precision not in BITS:
        raise GenerationQuantError(f"unknown generation precision {precision!r} (supported: {', '.join(BITS)})")
    if block_size < 16 or block_size & (block_size - 1):
        raise GenerationQuantError(f"block_size must be a power of two >= 16, got {block_size}")
    fp32_path, out_path = Path(fp32_path), Path(out_path)
    if not fp32_path.is_file():
        raise FileNotFoundError(f"no ONNX graph at {fp32_path}")
    if out_path.resolve() == fp32_path.resolve():
        raise GenerationQuantError(f"refusing to overwrite the fp32 graph {fp32_path}")
    t0 = time.perf_counter()
    model = onnx.load(str(fp32_path))
    meta = _graph_meta(model, fp32_path)
    kind = meta["graph"]
    pol = policy or policies.policy(kind, precision)
    if (pol.component, pol.precision) != (kind, precision):
        raise GenerationQuantError(f"policy {pol.component}/{pol.precision} does not fit a {kind} graph at {precision}")
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    inlined = _inline_weight_identities(graph, set(inits))

    # Each quantisable weight once (its first MatMul = leader); other uses follow the leader's node.
    leaders: dict[str, dict[str, str]] = {}  # precision -> weight -> leader node name
    followers: dict[str, dict[str, str]] = {}  # precision -> node name -> weight
    counts: dict[str, int] = {}
    for i, node in enumerate(graph.node):
        if not node.name:
            node.name = f"{node.op_type}_{i}_unnamed"
        if node.op_type != "MatMul":
            continue
        w = inits.get(node.input[1])
        if w is None:
            continue  # activation x activation (attention scores / values): nothing to quantise
        target = pol.precision_for(node_scope(node), node.op_type)
        if target not in BITS or len(w.dims) != 2 or w.data_type != onnx.TensorProto.FLOAT:
            target = "fp32"
        counts[target] = counts.get(target, 0) + 1
        if target == "fp32":
            continue
        if node.input[1] in leaders.setdefault(target, {}):
            followers.setdefault(target, {})[node.name] = node.input[1]
        else:
            leaders[target][node.input[1]] = node.name
    if not leaders:
        raise GenerationQuantError(f"{fp32_path.name}: no MatMul weight is quantised under the {kind}/{precision} "
                                   "policy")
    fp32_bytes = sum(int(np.prod(inits[w].dims)) * 4 for group in leaders.values() for w in group)
    for target in sorted(leaders):  # one pass per bit width (a policy may keep some weights at int8)
        model = _quantize_pass(model, leaders[target], followers.get(target, {}), BITS[target],
                               block_size=block_size, accuracy_level=accuracy_level, is_symmetric=is_symmetric)
    graph = model.graph
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    graph.ClearField("initializer")
    graph.initializer.extend(kept)
    n_nbits = sum(n.op_type == "MatMulNBits" for n in graph.node)
    if n_nbits != sum(counts.get(p, 0) for p in BITS):
        raise RuntimeError(f"expected {sum(counts.get(p, 0) for p in BITS)} MatMulNBits nodes, found {n_nbits}")

    qmeta = {"method": "MatMulNBits weight-only (onnxruntime.quantization)", "bits": BITS[precision],
             "block_size": block_size, "accuracy_level": accuracy_level, "symmetric": is_symmetric,
             "matmuls": counts, "weights_quantized": sum(len(g) for g in leaders.values()),
             "identities_inlined": inlined,
             "source": fp32_path.name}
    record = dict(meta, precision=precision, quantization=qmeta)
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(record, sort_keys=True)
    model.doc_string = f"{model.doc_string} [weights {precision}, MatMulNBits block {block_size}]"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    files = _save(model, out_path)
    return {"graph": kind, "precision": precision, "files": files, **qmeta, "policy": pol.table(),
            "quantized_fp32_bytes": fp32_bytes, "seconds": round(time.perf_counter() - t0, 1)}
