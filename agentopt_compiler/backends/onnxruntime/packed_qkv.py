"""ORT lowering rule: feed GroupQueryAttention the packed q/k/v projection instead of its three slices.

Before:                                          After:
    qkv = MatMul(x, W_qkv)                           qkv = MatMul(x, W_qkv)
    q, k, v = Split(qkv, axis=-1)                    out, k', v' = GroupQueryAttention(qkv, None, None, past_k,
    out, k', v' = GroupQueryAttention(q, k, v,                                        past_v, ...)
                                      past_k, past_v, ...)

Why: ``pack_qkv_projections`` already makes one matmul per layer; GroupQueryAttention accepts that packed tensor
(key and value omitted: ``query`` holds Hq + 2 * Hkv heads) and splits it while it applies RoPE, so the Split node
and its three copies of the projection disappear from every decode step (what onnxruntime-genai's builder emits).

Fires only when the three GQA inputs are, in order, the only uses of the three outputs of one last-axis Split whose
sizes are the q, k and v widths. Not with fp16 caches (casts sit between the Split and GQA) and not for standard
ONNX engines (GroupQueryAttention is an ORT contrib op).
"""

from __future__ import annotations

import onnx_ir as ir


def _split_sizes(split: ir.Node) -> list[int] | None:
    if len(split.inputs) > 1 and split.inputs[1] is not None and split.inputs[1].const_value is not None:
        return [int(s) for s in split.inputs[1].const_value.numpy().tolist()]
    return None


def feed_packed_qkv(model: ir.Model) -> int:
    graph = model.graph
    rewritten = 0
    for node in list(graph):
        if node.op_type != "GroupQueryAttention" or node.domain != "com.microsoft" or len(node.inputs) < 3:
            continue
        q, k, v = node.inputs[:3]
        split = q.producer() if q is not None else None
        if split is None or split.op_type != "Split" or list(split.outputs) != [q, k, v]:
            continue
        if any(len(value.uses()) != 1 for value in (q, k, v)):
            continue
        packed = split.inputs[0]
        rank = len(packed.shape) if packed.shape is not None else None
        axis = split.attributes.get("axis")
        if rank is None or axis is None or axis.value not in (-1, rank - 1):
            continue
        heads, kv_heads = node.attributes["num_heads"].value, node.attributes["kv_num_heads"].value
        sizes = _split_sizes(split)
        if sizes is None or len(sizes) != 3 or sizes[1] != sizes[2] or sizes[0] * kv_heads != sizes[1] * heads:
            continue
        node.replace_input_with(0, packed)
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        graph.remove(split, safe=True)
        rewritten += 1
    return rewritten
