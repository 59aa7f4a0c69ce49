"""FP16 conversion of an ONNX graph with FP32 inputs and outputs, by ONNX Runtime's own converter.

``onnxruntime.transformers.float16.convert_float_to_float16`` does the conversion (weights and
compute in float16, a ``Cast`` after each graph input and before each graph output, the spec's
float32-only slots such as Resize scales kept float32). This wrapper adds what distillctl needs
around it:

- ``keep_fp32`` op types run in float32 between casts (ONNX Runtime's default block list plus the
  ops a runtime has no float16 kernel for; onnx.export_fp16 grows that set by trial);
- every float initializer is stored as float16, also one that only feeds a kept op (it is cast
  up where used): the file is half the FP32 size and a kept op loses nothing it would not lose in
  float16 anyway;
- the caller's proto is never modified, the result is topologically sorted (the library appends
  its casts at the end of the node list) and passes ``onnx.checker``.

On resnet18, test_vit, a ViT (patch 8, depth 2) and a Swin (window 4, depths 2-2) at 32 px this
gives the same nodes, the same float16 initializers and the same logits as the converter
distillctl had before (notes/export.md).
"""
from __future__ import annotations

from collections.abc import Iterable

import onnx


class ConversionError(ValueError):
    pass


def library_block_list() -> frozenset[str]:
    """Op types ONNX Runtime's converter keeps in float32 by default (TopK, Range, Min, Max, ...)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    return frozenset(DEFAULT_OP_BLOCK_LIST)


def _toposort(graph: onnx.GraphProto) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs."""
    ready = {vi.name for vi in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        waiting = []
        for node in pending:
            # names bound outside this graph (subgraph captures) never appear: treat them as ready
            if all(name in ready for name in node.input):
                ordered.append(node)
                ready.update(node.output)
            else:
                waiting.append(node)
        if len(waiting) == len(pending):
            missing = sorted({n for node in waiting for n in node.input if n not in ready})[:5]
            raise ConversionError(f"the FP16 graph has nodes whose inputs are never produced: {missing}")
        pending = waiting
    del graph.node[:]
    graph.node.extend(ordered)


def convert_float_to_float16(model: onnx.ModelProto, keep_fp32: Iterable[str] = frozenset()) -> onnx.ModelProto:
    """A float16 copy of ``model`` whose inputs and outputs are still float32; ``keep_fp32`` ops stay float32."""
    from onnxruntime.transformers.float16 import convert_float_to_float16 as library_convert

    if len(model.functions):
        # the library converts the main graph only: a local function would keep float32 inside
        raise ConversionError("graphs with local functions are not supported by the FP16 converter; "
                              "export with optimisation on (the default) to inline them")
    copy = onnx.ModelProto.FromString(model.SerializeToString())  # the library edits its argument in place
    try:
        half = library_convert(copy, keep_io_types=True, op_block_list=sorted(library_block_list() | set(keep_fp32)),
                               force_fp16_initializers=True)
    except Exception as err:  # the library raises AssertionError/ValueError/KeyError on graphs it cannot handle
        raise ConversionError(f"ONNX Runtime's FP16 converter failed: {type(err).__name__}: {err}") from None
    _toposort(half.graph)
    onnx.checker.check_model(half)
    return half
