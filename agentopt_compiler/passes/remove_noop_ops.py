"""Pass ``remove_noop_ops``: drop ops that return their input unchanged.

Before:                                   After:
    x32 = aten.to.dtype(x, float32)           (uses of x32 read x)
    aten._assert_tensor_metadata(x32, ...)
    y = aten.clone(x32)                       (uses of y read x)
    z = aten.mul(y, w)                        z = aten.mul(x, w)

Why: captured graphs carry casts to the dtype a tensor already has (HF-style ``x.float()`` in RMSNorm), trace-time
metadata asserts, defensive clones and eval-mode dropout. They cost a node each after lowering, and they break the
patterns later fusions match (a cast between SDPA and its inputs hides the attention pattern). Removing them first
means every fusion needs one canonical pattern.

Never fires on a cast that changes dtype or device, on a copy whose input or result is mutated in place (the copy
is a snapshot then), or on dropout in training mode.
"""

from __future__ import annotations

from collections import Counter

import torch

from .infra import GraphPass, PassResult

aten = torch.ops.aten

_IDENTITY_OPS = {aten.alias.default, aten.clone.default, aten.contiguous.default}
_CAST_OPS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout, aten.type_as.default}  # (Gemma's norms)
_DROPOUT_OPS = {aten.dropout.default}
_ASSERT_OPS = {aten._assert_tensor_metadata.default}


def _meta(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else None


class RemoveNoopOps(GraphPass):
    name = "remove_noop_ops"

    def check(self, node: torch.fx.Node) -> str | None:
        """None if ``node`` can be removed, else the reason it must stay."""
        if node.target in _ASSERT_OPS:
            return None
        if node.args and isinstance(node.args[0], torch.fx.Node) and (
                any(_mutates(user, node.args[0]) for user in node.args[0].users)
                or any(_mutates(user, node) for user in node.users)):
            return "its input or result is mutated in place; the copy is needed"
        source, out = _meta(node.args[0]) if node.args else None, _meta(node)
        if node.target in _CAST_OPS:
            if source is None or out is None:
                return "cast without shape metadata"
            if source.dtype != out.dtype or source.device != out.device:
                return f"cast {source.dtype}->{out.dtype} changes the value"
            if node.kwargs.get("memory_format") not in (None, torch.preserve_format):
                return "cast changes memory format"
            return None
        if node.target in _IDENTITY_OPS:
            if node.kwargs.get("memory_format") not in (None, torch.preserve_format, torch.contiguous_format):
                return "clone changes memory format"
            return None
        if node.target in _DROPOUT_OPS:
            p, train = (list(node.args[1:]) + [0.0, False])[:2]
            return None if (p == 0 or not train) else "dropout in training mode"
        return "not a no-op kind"

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        removed: Counter = Counter()
        kept: list[str] = []
        candidates = _ASSERT_OPS | _CAST_OPS | _IDENTITY_OPS | _DROPOUT_OPS
        for node in list(gm.graph.nodes):
            if node.op != "call_function" or node.target not in candidates:
                continue
            reason = self.check(node)
            if reason is not None:
                kept.append(f"{node.name}: {reason}")
                continue
            if node.target not in _ASSERT_OPS:
                node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
            removed[str(node.target).split(".")[1]] += 1  # e.g. "to", "clone", "_assert_tensor_metadata"
        return PassResult(bool(removed), dict(removed), tuple(kept))


def _mutates(user: torch.fx.Node, value: torch.fx.Node) -> bool:
    """Does ``user`` write into ``value`` (an argument its schema marks as written, e.g. self of add_)?"""
    schema = getattr(user.target, "_schema", None)
    if schema is None or not schema.is_mutable:
        return False
    for index, argument in enumerate(schema.arguments):
        if argument.alias_info is not None and argument.alias_info.is_write:
            passed = user.args[index] if index < len(user.args) else user.kwargs.get(argument.name)
            if passed is value:
                return True
    return False
