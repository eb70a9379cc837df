"""Pass ``assign_layer_precision``: apply a precision plan to the linear layers it names.

Before:                                   After (a unit planned int4, block 32):
    y = aten.linear(x, W, b)                  y = agentopt.weight_only_linear(x, qW, scales, zero_points,
                                                                              bits=4, block=32, in_features=K)
                                              y = y + b                       (when the layer has a bias)

Why: decode is bound by streaming weights; 4-bit weights are 1/8 of the fp32 bytes and ORT's MatMulNBits
(accuracy level 4) runs them several times faster than fp32 MatMul on CPU. Weights are quantized here, once, in the
layout MatMulNBits reads, so the lowering only renames the op and the eager graph computes the same dequantized
weights (the reference for fidelity checks).

fp16/bf16 units are kept fp32 on the CPU backend (ONNX Runtime CPU has no faster kernels for them) and the pass
says so in its notes. Units whose in-features are not a multiple of the block size are kept fp32, with a note.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..capture.quantized_linear import quantize_blockwise
from .infra import GraphPass, PassResult
from .precision_plan import BITS, PrecisionPlan, unit_of

aten = torch.ops.aten


def _owner(gm: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    owner = gm
    *path, leaf = target.split(".")
    for part in path:
        owner = getattr(owner, part)
    return owner, leaf


class AssignLayerPrecision(GraphPass):
    name = "assign_layer_precision"

    def __init__(self, plan: PrecisionPlan | None = None):
        self.plan = plan

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        if self.plan is None or not self.plan.units:
            return PassResult(False, {}, ("no precision plan given",))
        from ..capture import quantized_linear  # noqa: F401  (registers torch.ops.agentopt.weight_only_linear)

        changed: Counter = Counter()
        notes: list[str] = []
        graph = gm.graph
        for node in [n for n in graph.nodes if n.target == aten.linear.default]:
            weight_node = node.args[1]
            if weight_node.op != "get_attr":
                continue
            module_path = weight_node.target.rsplit(".", 1)[0]
            unit = unit_of(module_path)
            precision = self.plan.precision_of(unit)
            if precision in ("fp16", "bf16"):
                notes.append(f"{unit}: {precision} gives no speed on ONNX Runtime CPU; kept fp32")
                continue
            if precision not in BITS:
                continue
            owner, leaf = _owner(gm, weight_node.target)
            weight = getattr(owner, leaf).detach()
            n_out, k_in = weight.shape
            if k_in % self.plan.block_size:
                notes.append(f"{unit}: in_features {k_in} is not a multiple of block {self.plan.block_size}; fp32")
                continue
            bits = BITS[precision]
            qweight, scales, zero_points = quantize_blockwise(weight, bits, self.plan.block_size)
            owner.register_buffer(f"{leaf}_q{bits}", qweight)
            owner.register_buffer(f"{leaf}_scales", scales)
            owner.register_buffer(f"{leaf}_zero_points", zero_points)
            with graph.inserting_before(node):
                buffers = [graph.get_attr(f"{weight_node.target}_{suffix}")
                           for suffix in (f"q{bits}", "scales", "zero_points")]
                quantized = graph.call_function(torch.ops.agentopt.weight_only_linear.default,
                                                (node.args[0], *buffers, bits, self.plan.block_size, k_in))
                quantized.meta["nn_module_stack"] = node.meta.get("nn_module_stack", {})
                result = quantized
                if len(node.args) > 2 and node.args[2] is not None:
                    result = graph.call_function(aten.add.Tensor, (quantized, node.args[2]))
            node.replace_all_uses_with(result)
            graph.erase_node(node)
            if not weight_node.users:  # the fp32 weight is no longer exported
                graph.erase_node(weight_node)
                delattr(owner, leaf)
            changed[precision] += 1
        return PassResult(bool(changed), {f"{p}_linears": c for p, c in changed.items()}, tuple(notes))
