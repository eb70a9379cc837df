"""Pass ``pack_qkv_projections``: the q, k and v projections of a fused attention op become one matmul.

Before:                                          After:
    q = linear(x, Wq, bq)                            qkv = linear(x, cat(Wq, Wk, Wv), cat(bq, bk, bv))
    k = linear(x, Wk, bk)                            q, k, v = split(qkv, [Hq*D, Hkv*D, Hkv*D], -1)
    v = linear(x, Wv, bv)                            agentopt.cached_attention(q, k, v, ...)
    agentopt.cached_attention(q, k, v, ...)

Why: at decode time a projection is a (B, 1, E) x (E, N) matrix-vector product, so its cost is dominated by the fixed
per-kernel overhead and by streaming the weights; one wider matmul streams the same weights with one kernel launch
instead of three. Each output column is the same dot product as before, so the result is unchanged.

Runs after ``fuse_kv_cache`` (it packs only projections that feed one fused attention op, where the split sizes are
known) and fires only when all three projections read the same input, are used nowhere else, and agree on bias.
Where per-head ops sit between the projections and the op (Qwen3 / Gemma 3 normalize q and k per head), it packs the
attention module's ``q_proj`` / ``k_proj`` / ``v_proj`` linears and the per-head ops read the split.

Models that ship the projection packed (Phi-3's ``qkv_proj``) reach the op as three slices of it; those become the
same ``split`` (``packed_slices``), so the backend sees one packed projection either way:

    q, k, v = qkv[..., :a], qkv[..., a:a+b], qkv[..., a+b:]   ->   q, k, v = split(qkv, [a, b, c], -1)
"""

from __future__ import annotations

import operator

import torch

from ..capture import custom_ops  # noqa: F401  (registers torch.ops.agentopt.*)
from .infra import GraphPass, PassResult

aten = torch.ops.aten


def _attr(gm: torch.nn.Module, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


class PackQKVProjections(GraphPass):
    name = "pack_qkv_projections"

    def check(self, attention: torch.fx.Node) -> str | None:
        """None if the q/k/v projections of this fused attention node can be packed, else why not."""
        projections = _projections(attention)
        if not all(isinstance(p, torch.fx.Node) and p.target == aten.linear.default for p in projections):
            return "q, k and v are not all linear projections"
        if len({p.args[0] for p in projections}) != 1:
            return "q, k and v project different inputs"
        if any(len(p.users) != 1 for p in projections):
            return "a projection is used outside the attention op"
        biases = [p.args[2] if len(p.args) > 2 else None for p in projections]
        if len({b is None for b in biases}) != 1:
            return "some projections have a bias and some do not"
        if any(w.op != "get_attr" for w in [p.args[1] for p in projections]):
            return "a projection weight is not a parameter"
        return None

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        packed, sliced, notes = 0, 0, []
        graph = gm.graph
        for attention in [n for n in graph.nodes if n.target == torch.ops.agentopt.cached_attention.default]:
            if _split_packed_slices(graph, attention):
                sliced += 1
                continue
            reason = self.check(attention)
            if reason:
                notes.append(f"{attention.name}: {reason}")
                continue
            q, k, v = _projections(attention)
            weights = [_attr(gm, p.args[1].target) for p in (q, k, v)]
            has_bias = len(q.args) > 2 and q.args[2] is not None
            # the packed projection lives next to the originals: layers.3.self_attn.qkv_proj.{weight,bias}
            parent_path = q.args[1].target.rsplit(".", 2)[0]  # e.g. layers.3.self_attn
            packed_module = torch.nn.Module()
            packed_module.register_parameter("weight", torch.nn.Parameter(torch.cat(weights, 0).detach(), False))
            if has_bias:
                biases = [_attr(gm, p.args[2].target) for p in (q, k, v)]
                packed_module.register_parameter("bias", torch.nn.Parameter(torch.cat(biases, 0).detach(), False))
            (_attr(gm, parent_path) if parent_path else gm).add_module("qkv_proj", packed_module)
            weight_name, bias_name = f"{parent_path}.qkv_proj.weight", f"{parent_path}.qkv_proj.bias"
            sizes = [w.shape[0] for w in weights]
            with graph.inserting_before(q):
                weight = graph.get_attr(weight_name)
                args = [q.args[0], weight] + ([graph.get_attr(bias_name)] if has_bias else [])
                qkv = graph.call_function(aten.linear.default, tuple(args))
                qkv.meta["nn_module_stack"] = q.meta.get("nn_module_stack", {})
                split = graph.call_function(aten.split_with_sizes.default, (qkv, sizes, -1))
                parts = [graph.call_function(operator.getitem, (split, i)) for i in range(3)]
            old_params = [p.args[1] for p in (q, k, v)] + ([p.args[2] for p in (q, k, v)] if has_bias else [])
            for old, new in zip((q, k, v), parts):
                old.replace_all_uses_with(new)
                graph.erase_node(old)
            for param in old_params:  # drop the separate weights so they are not exported twice
                if not param.users:
                    target = param.target
                    graph.erase_node(param)
                    owner, _, leaf = target.rpartition(".")
                    delattr(_attr(gm, owner) if owner else gm, leaf)
            packed += 1
        stats = {"packed_projections": packed} if packed else {}
        if sliced:
            stats["packed_slices"] = sliced
        return PassResult(bool(packed or sliced), stats, tuple(notes))


def _projections(attention: torch.fx.Node) -> tuple:
    """The op's q/k/v inputs; or, where per-head ops sit between the projections and the op (Qwen3 / Gemma 3
    QK-norms), the linears named ``<attention module>.{q,k,v}_proj`` that project one input (packing three linears of
    one input is exact whoever reads them)."""
    direct = attention.args[:3]
    if all(isinstance(p, torch.fx.Node) and p.target == aten.linear.default for p in direct):
        return tuple(direct)
    stack = attention.meta.get("nn_module_stack") or {}
    paths = [path for path, _ in stack.values() if path.endswith("self_attn")]
    if not paths:
        return tuple(direct)
    wanted = {f"{paths[-1]}.{name}_proj.weight": name for name in "qkv"}
    found = {wanted[n.args[1].target]: n for n in attention.graph.nodes if n.target == aten.linear.default
             and isinstance(n.args[1], torch.fx.Node) and n.args[1].op == "get_attr" and n.args[1].target in wanted}
    return tuple(found.get(name, d) for name, d in zip("qkv", direct))


def _split_packed_slices(graph: torch.fx.Graph, attention: torch.fx.Node) -> bool:
    """q, k, v = three back-to-back last-axis slices of one projection (used only there) -> one split of it."""
    slices = attention.args[:3]
    if not all(isinstance(s, torch.fx.Node) and s.target == aten.slice.Tensor and len(s.users) == 1 for s in slices):
        return False
    packed = slices[0].args[0]
    val = packed.meta.get("val")
    if val is None or any(s.args[0] is not packed for s in slices) or packed.target != aten.linear.default:
        return False
    width, bounds = val.shape[-1], []
    for s in slices:
        args = list(s.args) + [None] * 5
        if args[1] not in (-1, val.dim() - 1) or (args[4] or 1) != 1:
            return False
        bounds.append((args[2] or 0, width if args[3] is None else min(args[3], width)))
    if [b[0] for b in bounds] != [0, bounds[0][1], bounds[1][1]] or bounds[2][1] != width:
        return False
    with graph.inserting_before(slices[0]):
        split = graph.call_function(aten.split_with_sizes.default, (packed, [e - b for b, e in bounds], -1))
        parts = [graph.call_function(operator.getitem, (split, i)) for i in range(3)]
    for old, new in zip(slices, parts):
        old.replace_all_uses_with(new)
        graph.erase_node(old)
    return True
