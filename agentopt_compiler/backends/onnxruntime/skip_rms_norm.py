"""ORT lowering rule: residual add + RMSNormalization -> ``com.microsoft.SkipSimplifiedLayerNormalization``.

Before:                                  After:
    h = Add(x, attn_out)                     y, _, _, h = SkipSimplifiedLayerNormalization(x, attn_out, w,
    y = RMSNormalization(h, w, eps)                                                      epsilon=eps)

Why: every decoder layer has two of these pairs. ORT's CPU kernel does the add and the normalization in one pass over
the hidden state (and ORT's own optimizer does not fuse the opset-23 ``RMSNormalization`` op), so at decode time this
saves two kernel launches per layer. Runs on the ONNX graph because it is specific to ORT's contrib ops; it is
skipped for ``--attention-impl standard``, whose point is standard ONNX only.

Fires only on a last-axis RMSNormalization of an Add whose two inputs have the same shape (no broadcasting).
"""

from __future__ import annotations

import onnx_ir as ir


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    return a.shape is not None and b.shape is not None and list(a.shape) == list(b.shape)


def fuse_skip_rms_norm(model: ir.Model) -> int:
    graph = model.graph
    fused = 0
    for norm in list(graph):
        if norm.op_type != "RMSNormalization" or norm.domain not in ("", "ai.onnx"):
            continue
        add = norm.inputs[0].producer() if norm.inputs[0] is not None else None
        if add is None or add.op_type != "Add" or add.domain not in ("", "ai.onnx") or len(norm.inputs) < 2:
            continue
        axis = norm.attributes.get("axis")
        if axis is not None and axis.value not in (-1, len(norm.inputs[0].shape or ()) - 1):
            continue
        x, skip = add.inputs
        if not _same_shape(x, skip):
            continue
        epsilon = norm.attributes.get("epsilon")
        attributes = [ir.AttrFloat32("epsilon", epsilon.value if epsilon is not None else 1e-5)]
        fused_node = ir.Node("com.microsoft", "SkipSimplifiedLayerNormalization", [x, skip, norm.inputs[1]],
                             attributes, num_outputs=4, name=f"{norm.name}_skip")
        graph.insert_before(add, fused_node)
        out, _mean, _inv_std, residual = fused_node.outputs
        out.name, residual.name = f"{norm.outputs[0].name}_fused", f"{add.outputs[0].name}_fused"
        for new, old in ((out, norm.outputs[0]), (residual, add.outputs[0])):
            new.shape, new.type = old.shape, old.type  # later matches (the next layer's add) check shapes
        norm.outputs[0].replace_all_uses_with(out)
        add.outputs[0].replace_all_uses_with(residual)
        graph.remove([norm, add], safe=True)
        fused += 1
    if fused:
        model.opset_imports.setdefault("com.microsoft", 1)
    return fused
