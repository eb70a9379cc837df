"""Lowering rule: compute Slice and Cast of constant tables once, at compile time.

Before:                                              After:
    rope_cos (4096, 64) initializer                      rope_cos_256x32_float32 (C=256, 32) initializer
    cos_half = Slice(rope_cos, [0, 0], [C, 32])          GroupQueryAttention(..., rope_cos_256x32_float32, ...)
    GroupQueryAttention(..., cos_half, ...)

Why: the RoPE tables come out of capture at the model's ``max_position_embeddings`` rows and full head width, but
GroupQueryAttention reads half the width and only the rows of positions the cache can hold (C, its capacity). Left
in the graph, the engine file stores the full tables (2 MiB for a 4096-position, 64-wide head: more than the int4
savings of a layer) and every call slices them again. Folded, the engine stores (C, D/2) tables: no larger than
what onnxruntime-genai's builder writes for the same model, and usually much smaller.

Fires on Slice (constant data, starts, ends, axes and steps) and on Cast of a constant; the table it replaces is
removed once nothing else reads it, and identical slices (one per layer) share one table. Never touches a Slice of
a runtime value (positions, activations), nor copies a big slice out of a table that other nodes still read.
"""

from __future__ import annotations

import re

import numpy as np
import onnx_ir as ir

_FOLDED_SUFFIX = r"_\d+(x\d+)*_[a-z]+\d*$"  # the shape/dtype suffix a previous fold gave the table


def _constant(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    if value.const_value is not None:
        return value.const_value.numpy()
    producer = value.producer()
    if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
        return producer.attributes["value"].value.numpy()
    return None


def _sliced(node: ir.Node) -> np.ndarray | None:
    data, starts, ends = (_constant(v) for v in node.inputs[:3])
    if data is None or starts is None or ends is None:
        return None
    axes = _constant(node.inputs[3]) if len(node.inputs) > 3 and node.inputs[3] is not None else np.arange(len(starts))
    steps = _constant(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4] is not None else np.ones(len(starts))
    if axes is None or steps is None:
        return None
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts.tolist(), ends.tolist(), axes.tolist(), steps.tolist()):
        index[int(axis)] = slice(int(start), int(end), int(step))
    return np.ascontiguousarray(data[tuple(index)])


def _cast(node: ir.Node) -> np.ndarray | None:
    data = _constant(node.inputs[0])
    if data is None:
        return None
    return data.astype(ir.DataType(node.attributes["to"].value).numpy())


_FOLDERS = {"Slice": _sliced, "Cast": _cast}
SMALL_BYTES = 64 * 1024  # a table that stays read elsewhere is copied only when its slice is this small


def fold_constant_slices(model: ir.Model) -> int:
    """Replace Slice/Cast nodes of constants by initializers; return how many were folded."""
    graph = model.graph
    folded = 0
    tables: dict[tuple, ir.Value] = {}  # the same slice of the same table (one per layer) is stored once
    for node in list(graph):  # topological order: a Cast of a folded Slice is folded in the same pass
        fold = _FOLDERS.get(node.op_type) if node.domain in ("", "ai.onnx") else None
        result = fold(node) if fold is not None else None
        if result is None:
            continue
        source = node.inputs[0]
        if len(source.uses()) > 1 and result.nbytes > SMALL_BYTES and not _all_same_fold(source):
            continue  # the whole table stays for its other readers: a big slice would only add bytes
        key = (source.name, node.op_type, tuple(v.name if v is not None else "" for v in node.inputs[1:]),
               tuple(sorted((k, str(a.value)) for k, a in node.attributes.items())))
        table = tables.get(key)
        if table is None:
            name = f"{re.sub(_FOLDED_SUFFIX, '', source.name)}_{'x'.join(map(str, result.shape))}_{result.dtype}"
            while name in graph.initializers:  # e.g. rope_cos_256x32_float32
                name += "_"
            table = ir.Value(name=name, shape=ir.Shape(result.shape), type=ir.TensorType(
                ir.DataType.from_numpy(result.dtype)), const_value=ir.tensor(result))
            graph.register_initializer(table)
            tables[key] = table
        output = node.outputs[0]
        output.replace_all_uses_with(table)
        sources = [v for v in node.inputs if v is not None]
        graph.remove(node, safe=True)
        for source in sources:  # drop the tables (and constant arguments) nothing reads any more
            if source.uses() or source.is_graph_output():
                continue
            if source.is_initializer():
                graph.initializers.pop(source.name)
            elif source.producer() is not None and source.producer().op_type == "Constant":
                graph.remove(source.producer(), safe=True)
        folded += 1
    return folded


def _all_same_fold(source: ir.Value) -> bool:
    """Whether every reader of ``source`` is a node of one op type with the same other inputs and attributes (the
    per-layer copies of one Slice): then the source goes away once they are folded."""
    signatures = {(use.node.op_type, tuple(v.name if v is not None else "" for v in use.node.inputs[1:]),
                   tuple(sorted((k, str(a.value)) for k, a in use.node.attributes.items())))
                  for use in source.uses()}
    return len(signatures) == 1 and all(use.idx == 0 for use in source.uses())
