"""Pass ``assign_layer_precision``: apply a precision plan to the linear layers it names.

Before:                                   After (a unit planned int4, block 32):
    y = aten.linear(x, W, b)                  y = agentopt.weight_only_linear(x, qW, scales, zero_points,
                                                                              bits=4, block=32, in_features=K)
                                              y = y + b                       (when the layer has a bias)

Why: decode is bound by streaming weights; 4-bit weights are 1/8 of the fp32 bytes and ORT's MatMulNBits
(accuracy level 4) runs them several times faster than fp32 MatMul on CPU. Weights are quantized here, once, in the
layout MatMulNBits reads, so the lowering only renames the op and the eager graph computes the same dequantized
weights (the reference for fidelity checks).

fp16/bf16 units become half-precision regions where the target runs them on native kernels (``half_precision``:
ONNX Runtime CUDA, TensorRT; ``BackendEntry.half_precision_devices``):

Before:                                   After (a unit planned fp16):
    y = aten.linear(x, W, b)                  x16 = aten._to_copy(x, dtype=float16)          -> ONNX Cast
                                              y16 = aten.linear(x16, W16, b16)               -> MatMul (fp16 weights)
                                              y   = aten._to_copy(y16, dtype=float32)        -> ONNX Cast

Only the planned linears change: norms, softmax/attention, residual adds and every unit the plan leaves fp32 stay
fp32 islands, and the explicit casts make the ONNX strongly typed, so TensorRT's strong typing and ORT CUDA run
exactly the planned precision. On ONNX Runtime CPU (no faster fp16/bf16 kernels) such units are kept fp32 and the
pass says so in its notes. A unit's block is its own when the plan names one (``int4@128``), else the plan's
``block_size``; units whose in-features are not a multiple of it are kept fp32, with a note.
"""

from __future__ import annotations

from collections import Counter

import torch

from ..capture.quantized_linear import quantize_blockwise
from .infra import GraphPass, PassResult, owner_of
from .precision_plan import BITS, PrecisionPlan, unit_of

aten = torch.ops.aten
HALF_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def _make_half_region(gm: torch.fx.GraphModule, node: torch.fx.Node, dtype: torch.dtype) -> None:
    """Rewrite ``linear(x, W, b)`` as ``to_fp32(linear(to_half(x), W_half, b_half))`` with the weights stored in
    half precision (the fp32 copies are dropped when nothing else reads them)."""
    graph = gm.graph
    args = list(node.args)
    originals = [args[i] for i in (1, 2) if i < len(args) and args[i] is not None and args[i].op == "get_attr"]
    for i in (1, 2):
        if i >= len(args) or args[i] is None:
            continue
        if args[i].op != "get_attr":  # a computed bias: cast it in the graph
            with graph.inserting_before(node):
                args[i] = graph.call_function(aten._to_copy.default, (args[i],), {"dtype": dtype})
            continue
        owner, leaf = owner_of(gm, args[i].target)
        half_name = f"{leaf}_{str(dtype).removeprefix('torch.')}"
        owner.register_buffer(half_name, getattr(owner, leaf).detach().to(dtype))
        prefix = args[i].target.rsplit(".", 1)[0] + "." if "." in args[i].target else ""
        with graph.inserting_before(node):
            args[i] = graph.get_attr(prefix + half_name)
    with graph.inserting_before(node):
        args[0] = graph.call_function(aten._to_copy.default, (args[0],), {"dtype": dtype})
    node.args = tuple(args)
    with graph.inserting_after(node):
        back = graph.call_function(aten._to_copy.default, (node,), {"dtype": torch.float32})
    node.replace_all_uses_with(back, delete_user_cb=lambda user: user is not back)
    for original in originals:
        if not original.users:  # the fp32 copy is no longer exported
            owner, leaf = owner_of(gm, original.target)
            graph.erase_node(original)
            delattr(owner, leaf)


class AssignLayerPrecision(GraphPass):
    name = "assign_layer_precision"

    def __init__(self, plan: PrecisionPlan | None = None, half_precision: bool = False):
        self.plan = plan
        self.half_precision = half_precision  # whether the target runs fp16/bf16 regions natively

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        if self.plan is None or not self.plan.units:
            return PassResult(False, {}, ("no precision plan given",))
        from ..capture import quantized_linear  # noqa: F401  (registers torch.ops.agentopt.weight_only_linear)

        changed: Counter = Counter()
        unmet: list[str] = []  # the plan's units that stay fp32, and why
        graph = gm.graph
        for node in [n for n in graph.nodes if n.target == aten.linear.default]:
            weight_node = node.args[1]
            if weight_node.op != "get_attr":
                continue
            module_path = weight_node.target.rsplit(".", 1)[0]
            unit = unit_of(module_path)
            precision = self.plan.precision_of(unit)
            if precision in HALF_DTYPES:
                if not self.half_precision:
                    unmet.append(f"{unit}: {precision} (it gives no speed on ONNX Runtime CPU; kept fp32)")
                    continue
                _make_half_region(gm, node, HALF_DTYPES[precision])
                changed[precision] += 1
                continue
            if precision not in BITS:
                continue
            owner, leaf = owner_of(gm, weight_node.target)
            weight = getattr(owner, leaf).detach()
            n_out, k_in = weight.shape
            block = self.plan.block_of(unit)
            if k_in % block:
                unmet.append(f"{unit}: {precision}@{block} (in_features {k_in} is not a multiple of block {block}; "
                             f"kept fp32: give it a block that divides {k_in}, e.g. {precision}@16)")
                continue
            bits = BITS[precision]
            qweight, scales, zero_points = quantize_blockwise(weight, bits, block, self.plan.symmetric)
            owner.register_buffer(f"{leaf}_q{bits}", qweight)
            owner.register_buffer(f"{leaf}_scales", scales)
            owner.register_buffer(f"{leaf}_zero_points", zero_points)
            with graph.inserting_before(node):
                buffers = [graph.get_attr(f"{weight_node.target}_{suffix}")
                           for suffix in (f"q{bits}", "scales", "zero_points")]
                quantized = graph.call_function(torch.ops.agentopt.weight_only_linear.default,
                                                (node.args[0], *buffers, bits, block, k_in))
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
        return PassResult(bool(changed), {f"{p}_linears": c for p, c in changed.items()}, tuple(unmet),
                          tuple(unmet))
