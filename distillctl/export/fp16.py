"""FP16 conversion of an ONNX graph with FP32 inputs and outputs.

Weights and compute become float16; the graph inputs and outputs stay float32 (a ``Cast``
after each input and before each output), so callers feed and read the same arrays as for
the FP32 model. ``onnxconverter-common`` does the same job but is not a dependency; this is a
small, explicit version for the plain feed-forward graphs timm classifiers export to
(no If/Loop subgraphs: those are refused rather than half converted).

Ops listed in ``keep_fp32`` run in float32 with casts around them: used when a runtime lacks
a float16 kernel for an op, and for the few inputs the ONNX spec types as float32 whatever
the data type (Resize roi/scales).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)

# (op_type, input index) slots that the spec types as float32 whatever the compute type
_FP32_SLOTS = {("Resize", 1), ("Resize", 2), ("Upsample", 1)}
# attributes naming an output data type that must follow the compute type
_DTYPE_ATTRS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
                "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Multinomial": "dtype"}


class ConversionError(ValueError):
    pass


def _to_fp16_array(arr: np.ndarray) -> np.ndarray:
    # clip rather than overflow to inf: a weight beyond 65504 is already a bug, inf would hide where
    return np.clip(arr, -FP16_MAX, FP16_MAX).astype(np.float16)


def _tensor_to_fp16(t: onnx.TensorProto) -> onnx.TensorProto:
    if t.data_type != FLOAT:
        return t
    out = numpy_helper.from_array(_to_fp16_array(numpy_helper.to_array(t)), t.name)
    out.doc_string = t.doc_string
    return out


def _float_names(model: onnx.ModelProto) -> set[str]:
    """Names of every float32 tensor in the graph (inputs, outputs, initializers, inferred values)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    names = {t.name for t in g.initializer if t.data_type == FLOAT}
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.type.tensor_type.elem_type == FLOAT:
            names.add(vi.name)
    for node in g.node:  # Constant outputs are not always in value_info
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type == FLOAT:
                    names.add(node.output[0])
    return names


def convert_float_to_float16(model: onnx.ModelProto, keep_fp32: frozenset[str] | set[str] = frozenset()
                             ) -> onnx.ModelProto:
    """A float16 copy of ``model`` whose inputs and outputs are still float32."""
    model = onnx.ModelProto.FromString(model.SerializeToString())  # never touch the caller's proto
    g = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in g.node for a in n.attribute):
        raise ConversionError("graphs with control flow (If/Loop/Scan) are not supported by the FP16 converter")
    if len(model.functions):
        raise ConversionError("graphs with local functions are not supported by the FP16 converter; "
                              "export with optimisation on (the default) to inline them")
    floats = _float_names(model)
    graph_inputs = {vi.name for vi in g.input if vi.type.tensor_type.elem_type == FLOAT}
    graph_outputs = {vi.name for vi in g.output if vi.type.tensor_type.elem_type == FLOAT}

    # stored constants (initializers, Constant outputs) that feed a float32 slot stay float32;
    # a computed tensor feeding such a slot gets a Cast instead
    stored = {t.name for t in g.initializer} | {n.output[0] for n in g.node if n.op_type == "Constant"}
    fp32_tensors: set[str] = set()
    for node in g.node:
        for i, name in enumerate(node.input):
            if (node.op_type, i) in _FP32_SLOTS and name in stored:
                fp32_tensors.add(name)

    new_nodes: list[onnx.NodeProto] = []
    counter = [0]

    def cast(src: str, to: int, hint: str) -> str:
        counter[0] += 1
        dst = f"{hint}__cast{counter[0]}"
        new_nodes.append(helper.make_node("Cast", [src], [dst], to=to, name=f"fp16_cast_{counter[0]}"))
        return dst

    # graph inputs: cast once to fp16 and feed consumers the cast tensor
    renamed_in = {}
    for name in graph_inputs:
        renamed_in[name] = cast(name, FLOAT16, name)

    # initializers: fp16 unless they feed a float32 slot (then keep both when needed)
    init_fp32 = {}
    for t in g.initializer:
        if t.data_type == FLOAT and t.name in fp32_tensors:
            init_fp32[t.name] = t
    converted = [t if t.name in init_fp32 else _tensor_to_fp16(t) for t in g.initializer]
    del g.initializer[:]
    g.initializer.extend(converted)
    fp16_copy_of: dict[str, str] = {}  # fp32-kept tensor -> its fp16 twin for fp16 consumers

    def fp16_twin(name: str) -> str:
        if name not in fp16_copy_of:
            fp16_copy_of[name] = cast(name, FLOAT16, name)
        return fp16_copy_of[name]

    # graph outputs: the producer writes <name>__fp16, a final Cast restores <name> as float32
    out_rename = {name: f"{name}__fp16" for name in graph_outputs}

    for node in g.node:
        node = onnx.NodeProto.FromString(node.SerializeToString())
        kept = node.op_type in keep_fp32
        for i, name in enumerate(node.input):
            if not name:
                continue
            src = renamed_in.get(name, out_rename.get(name, name))
            if name not in floats:
                node.input[i] = src
                continue
            needs_fp32 = kept or (node.op_type, i) in _FP32_SLOTS
            if needs_fp32 and name not in fp32_tensors:
                src = cast(src, FLOAT, name)  # an fp16 tensor into a float32 slot
            elif not needs_fp32 and name in fp32_tensors:
                src = fp16_twin(name)
            node.input[i] = src
        for a in node.attribute:  # attributes that carry float data or name the float type
            if a.type == onnx.AttributeProto.TENSOR and a.t.data_type == FLOAT and not kept:
                if not (node.op_type == "Constant" and node.output[0] in fp32_tensors):
                    a.t.CopyFrom(_tensor_to_fp16(a.t))
            if a.name == _DTYPE_ATTRS.get(node.op_type) and a.i == FLOAT and not kept:
                if not any(o in fp32_tensors for o in node.output):
                    a.i = FLOAT16
        if kept:
            # outputs come out float32: rename them and cast back to fp16 for the rest of the graph
            outs = list(node.output)
            for j, name in enumerate(outs):
                if name in floats and name not in fp32_tensors:
                    node.output[j] = f"{name}__fp32"
            new_nodes.append(node)
            for j, name in enumerate(outs):
                if name in floats and name not in fp32_tensors:
                    final = out_rename.get(name, name)
                    new_nodes.append(helper.make_node("Cast", [node.output[j]], [final], to=FLOAT16,
                                                      name=f"fp16_restore_{name}"))
            continue
        for j, name in enumerate(node.output):
            if name in out_rename:
                node.output[j] = out_rename[name]
        new_nodes.append(node)

    for name in graph_outputs:
        new_nodes.append(helper.make_node("Cast", [out_rename[name]], [name], to=FLOAT, name=f"fp32_output_{name}"))
    del g.node[:]
    g.node.extend(new_nodes)
    del g.value_info[:]  # stale float32 annotations; runtimes re-infer
    onnx.checker.check_model(model)
    return model
