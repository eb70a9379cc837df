"""Lowering rule: compute once what several layers compute alike.

Before (each ring layer):                              After:
    t_i = initializer Range(0, C) - sinks (equal for        t = one initializer
          every layer, stored once per layer)
    held_i = f(positions, t_i) ; mask_i = g(held_i)         held = f(positions, t) ; mask = g(held)
    Attention(q_i, ring_k_i, ring_v_i, mask_i)              Attention(q_i, ring_k_i, ring_v_i, mask)

Why: the standard-op lowering of each fused attention (attention.py) computes its slot positions, its mask and its
scatter indices from the graph's ``positions`` and the layer's constants, so layers with the same pattern compute
the same tensors. The exporter's optimizer merges equal constants and then equal nodes, but only constants of up to
1024 elements, and a ring's slot table has sinks + window + 64 elements (1088 for a 1024-token window), so every
ring layer kept its own copy of that work: about 20 small nodes a layer, each costing a kernel dispatch per decode
step. Here equal initializers of up to 65536 elements become one, then nodes with the same op, attributes and
inputs become one (onnx_ir's passes), then what nothing reads goes. On ref-60m with a 1024-token window: 140 fewer
nodes, decode step 0.94-0.96x the unmerged engine's at 1024 tokens (paired medians of 16 interleaved rounds, three
runs). Dense GroupQueryAttention engines have nothing left to merge (0 nodes).

Merges only nodes whose inputs are the same values: per-layer tensors (projections, caches) never merge, so each
layer keeps its own cache update (ScatterND into its own ``past.*``).
"""

from __future__ import annotations

import onnx_ir as ir
from onnx_ir.passes import common

_MAX_SHARED_CONSTANT = 1 << 16  # elements: slot tables and masks, not weight matrices


def share_common_subexpressions(model: ir.Model) -> int:
    """Merge equal constants and the computations on them; returns how many nodes the graph lost."""
    before = len(model.graph)
    common.DeduplicateInitializersPass(size_limit=_MAX_SHARED_CONSTANT)(model)
    common.CommonSubexpressionEliminationPass()(model)
    common.RemoveUnusedNodesPass()(model)
    return before - len(model.graph)
