"""Pass ``fuse_kv_cache``: RoPE + KV-cache write + head expansion + SDPA -> one ``agentopt::cached_attention``.

Before (per layer):                                   After:
    q = transpose(view(q_proj(x)))                        out, k2, v2 = agentopt.cached_attention(
    k = transpose(view(k_proj(x)))                            q_proj(x), k_proj(x), v_proj(x),
    v = transpose(view(v_proj(x)))                            k_cache, v_cache, positions,
    q, k = rope(q, cos[pos], sin[pos]), rope(k, ...)          cos, sin, Hq, Hkv, window, scale, rotary)
    k_cache.index_copy_(2, pos, k)                        k_cache.copy_(k2); v_cache.copy_(v2)
    v_cache.index_copy_(2, pos, v)                        o_proj(out)
    o = sdpa(q, repeat_interleave(k_cache, n),
             repeat_interleave(v_cache, n), mask)
    o_proj(reshape(transpose(o)))

Why: per decode step the unfused lowering copies every layer's cache (torch.onnx wraps the write in full-cache
transposes), expands K/V to all query heads, and attends over the whole capacity. One fused op lowers to ORT's
GroupQueryAttention (RoPE inside, cache written in place, work proportional to the tokens cached) or to a portable
standard-ONNX form; either way the backend sees one op per layer instead of ~30.

Matches both our reference decoder and plain-SDPA models with an index-copy cache: with or without RoPE, cache
writes by ``scatter_`` at per-row positions (B, S), or ``index_copy_`` / ``index_put_`` (``cache[:, :, pos] = k``)
at shared positions (S,), heads expanded by ``repeat_interleave`` or Hugging Face's ``expand`` + ``reshape`` (or
not at all for MHA), a mask ``arange(T) <= pos`` (broadcast as key index against query position), optionally
``& arange(T) > pos - W`` (sliding window). It does not fire — and says why in the pass notes — when the
attention is not causal over positions (another mask, ``is_causal``, dropout), or a cache is read anywhere else.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch

from ..capture import custom_ops  # noqa: F401  (registers torch.ops.agentopt.*)
from .infra import GraphPass, PassResult

aten = torch.ops.aten
Node = torch.fx.Node


@dataclass
class AttentionMatch:
    q: Node  # (B, S, Hq*D) projections, before the head split
    k: Node
    v: Node
    k_cache: Node
    v_cache: Node
    positions: Node
    cos: Node | None
    sin: Node | None
    num_heads: int
    kv_num_heads: int
    window: int
    scale: float
    output: Node  # the reshape back to (B, S, Hq*D) that the fused op's output replaces
    chain: list[Node] = field(default_factory=list)  # matched nodes, erased once dead


class NoMatch(Exception):
    """Why a candidate SDPA is not the fusable pattern."""


def _is(node, *targets) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and node.target in targets


def _require(condition: bool, reason: str) -> None:
    if not condition:
        raise NoMatch(reason)


def _split_heads(node: Node, chain: list[Node]) -> tuple[Node, int, int]:
    """transpose(view(x, [B, S, H, D]), 1, 2) -> (x, H, D)."""
    _require(_is(node, aten.transpose.int) and sorted(node.args[1:3]) == [1, 2], f"{node.name} is not a head split")
    view = node.args[0]
    _require(_is(view, aten.view.default, aten.reshape.default, aten._unsafe_view.default) and
             len(view.args[1]) == 4, f"{view.name} is not a (B, S, H, D) view")
    heads, head_dim = view.args[1][2], view.args[1][3]
    _require(isinstance(heads, int) and isinstance(head_dim, int), "head count or head dim is symbolic")
    chain += [node, view]
    return view.args[0], heads, head_dim


def _rope(node: Node, chain: list[Node]) -> tuple[Node, Node, Node, Node] | None:
    """x * cos[pos] + cat(-x2, x1) * sin[pos] -> (x, cos_table, sin_table, pos); None if ``node`` is no RoPE."""
    if not _is(node, aten.add.Tensor) or len(node.args) != 2:
        return None
    for plain, rotated in (node.args, node.args[::-1]):
        if not (_is(plain, aten.mul.Tensor) and _is(rotated, aten.mul.Tensor)):
            continue
        for x, cos_rows in (plain.args, plain.args[::-1]):
            for half, sin_rows in (rotated.args, rotated.args[::-1]):
                cos_rows, sin_rows = _through_reshapes(cos_rows, chain), _through_reshapes(sin_rows, chain)
                if not (_is(half, aten.cat.default) and _is(cos_rows, aten.index.Tensor)
                        and _is(sin_rows, aten.index.Tensor)):
                    continue
                neg, first = half.args[0] if len(half.args[0]) == 2 else (None, None)
                if not (_is(neg, aten.neg.default) and _is(first, operator.getitem)):
                    continue
                second = neg.args[0]
                chunk = first.args[0]
                if not (_is(second, operator.getitem) and second.args[0] is chunk and _is(chunk, aten.chunk.default)
                        and chunk.args[0] is x and first.args[1] == 0 and second.args[1] == 1):
                    continue
                positions = cos_rows.args[1][0]
                if sin_rows.args[1][0] is not positions:
                    continue
                chain += [node, plain, rotated, half, neg, first, second, chunk, cos_rows, sin_rows]
                return x, cos_rows.args[0], sin_rows.args[0], positions
    return None


_RESHAPES = (aten.unsqueeze.default, aten.view.default, aten.reshape.default, aten.expand.default)


def _through_reshapes(node, chain: list[Node] | None = None):
    """Follow unsqueeze/view/reshape/expand back to the tensor they reshape."""
    while _is(node, *_RESHAPES):
        if chain is not None:
            chain.append(node)
        node = node.args[0]
    return node


def _cache_write(node: Node, chain: list[Node]) -> tuple[Node, Node, Node]:
    """cache.scatter_(2, pos[:, None, :, None].expand(...), new), cache.index_copy_(2, pos, new) or
    cache.index_put_([None, None, pos], new) -> (cache, pos, new)."""
    if _is(node, aten.scatter_.src) and node.args[1] == 2:
        cache, positions, new = node.args[0], _through_reshapes(node.args[2], chain), node.args[3]
        index, source = node.args[2].meta.get("val"), positions.meta.get("val")
        _require(index is not None and source is not None and source.dim() in (1, 2) and index.dim() == 4
                 and index.shape[1] == cache.meta["val"].shape[1] if "val" in cache.meta else True,
                 f"{node.name} scatters at indices that are not positions[:, None, :, None] broadcast over heads")
    elif _is(node, aten.index_copy_.default) and node.args[1] == 2:
        cache, positions, new = node.args[0], node.args[2], node.args[3]
    elif _is(node, aten.index_put_.default) and len(node.args[1]) == 3 and node.args[1][:2] == [None, None]:
        cache, positions, new = node.args[0], node.args[1][2], node.args[2]
        _require(not (len(node.args) > 3 and node.args[3]), f"{node.name} accumulates into the cache")
        new = _strip_unit_batch_view(new, chain)
    else:
        raise NoMatch(f"{node.name} is not an in-place cache write at the token positions")
    _require(cache.op == "get_attr", f"{node.name} writes into {cache.name}, which is not a cache buffer")
    _require(len(cache.users) == 1, f"cache {cache.target} is read elsewhere in the graph")
    chain.append(node)
    return cache, positions, new


def _strip_unit_batch_view(node: Node, chain: list[Node]) -> Node:
    """torch.export writes ``cache[:, :, pos] = k`` with B=1 as index_put_ of view(k, (H, S, D)): see through it."""
    if _is(node, aten.view.default, aten.reshape.default) and len(node.users) == 1:
        source, target = node.args[0].meta.get("val"), node.meta.get("val")
        if source is not None and target is not None and source.dim() == target.dim() + 1 and source.shape[0] == 1:
            chain.append(node)
            return node.args[0]
    return node


def _expand_heads(node: Node, chain: list[Node]) -> tuple[Node, int]:
    """repeat_interleave(x, n, 1), or HF's reshape(expand(x[:, :, None], ...)) -> (x, n); anything else is n=1."""
    if _is(node, aten.repeat_interleave.self_int) and node.args[2:3] == (1,):
        chain.append(node)
        return node.args[0], node.args[1]
    if _is(node, aten.reshape.default, aten.view.default) and _is(node.args[0], aten.expand.default):
        expand = node.args[0]
        unsqueeze = expand.args[0]
        if _is(unsqueeze, aten.unsqueeze.default) and unsqueeze.args[1] == 2 and isinstance(expand.args[1][2], int):
            chain += [node, expand, unsqueeze]
            return unsqueeze.args[0], expand.args[1][2]
    return node, 1


def _position_mask(mask: Node, positions: Node, capacity: int) -> int:
    """Recognize ``arange(T)[None] <= pos[:, None]`` (& ``arange(T)[None] > pos[:, None] - W``); return W or -1."""
    window = -1
    if _is(mask, aten.bitwise_and.Tensor, aten.logical_and.default, aten.__and__.Tensor):
        causal, limit = mask.args
        if _is(causal, aten.gt.Tensor):
            causal, limit = limit, causal
        _require(_is(limit, aten.gt.Tensor), "the attention mask is not a causal position mask")
        keys, shifted = limit.args
        _require(_is(shifted, aten.sub.Tensor) and isinstance(shifted.args[1], int) and
                 _is_key_positions(keys, capacity) and _is_query_positions(shifted.args[0], positions),
                 "the attention mask's window term is not key > position - W")
        window = shifted.args[1]
        mask = causal
    _require(_is(mask, aten.le.Tensor) and _is_key_positions(mask.args[0], capacity)
             and _is_query_positions(mask.args[1], positions),
             "the attention mask is not causal over the token positions (arange(T) <= positions[:, None])")
    return window


def _is_key_positions(node: Node, capacity: int) -> bool:
    """arange(T) shaped to broadcast along the last (key) axis only."""
    source, val = _through_reshapes(node), node.meta.get("val")
    shape_ok = val is None or (val.shape[-1] == capacity and all(d == 1 for d in val.shape[:-1]))
    return _is(source, aten.arange.default) and source.args == (capacity,) and shape_ok


def _is_query_positions(node: Node, positions: Node) -> bool:
    """The token positions shaped to broadcast along the query axis (last axis of size 1)."""
    val = node.meta.get("val")
    return _through_reshapes(node) is positions and (val is None or val.shape[-1] == 1)


class FuseKVCache(GraphPass):
    name = "fuse_kv_cache"

    def check(self, sdpa: Node) -> AttentionMatch:
        """The match for one SDPA node, or NoMatch with the reason it is not fusable."""
        args = list(sdpa.args) + [None] * (7 - len(sdpa.args))
        query, key, value, mask, dropout, is_causal = args[:6]
        mask = sdpa.kwargs.get("attn_mask", mask)
        _require(not (sdpa.kwargs.get("is_causal", is_causal) or False), "is_causal attention over a cache")
        _require(not (sdpa.kwargs.get("dropout_p", dropout) or 0.0), "attention with dropout")
        _require(isinstance(mask, Node), "attention without a mask is not causal over positions")
        chain: list[Node] = [sdpa]
        k_written, repeats = _expand_heads(key, chain)
        v_written, v_repeats = _expand_heads(value, chain)
        _require(repeats == v_repeats, "K and V are expanded differently")
        k_cache, positions, k_new = _cache_write(k_written, chain)
        v_cache, v_positions, v_new = _cache_write(v_written, chain)
        _require(v_positions is positions, "K and V are written at different positions")
        _require(len(k_written.users) == 1 and len(v_written.users) == 1, "the updated cache is read elsewhere")
        q_rope, k_rope = _rope(query, chain), _rope(k_new, chain)
        _require((q_rope is None) == (k_rope is None), "RoPE is applied to only one of Q and K")
        if q_rope is not None:
            _require(q_rope[1:] == k_rope[1:] and q_rope[3] is positions,
                     "Q and K are rotated with different tables or positions")
            query, k_new = q_rope[0], k_rope[0]
        q, num_heads, head_dim = _split_heads(query, chain)
        k, kv_num_heads, _ = _split_heads(k_new, chain)
        v, _, _ = _split_heads(v_new, chain)
        _require(num_heads == kv_num_heads * repeats, f"{num_heads} query heads do not match {kv_num_heads} KV heads "
                                                      f"expanded {repeats} times")
        capacity = k_cache.meta["val"].shape[2] if "val" in k_cache.meta else None
        capacity = capacity if capacity is not None else _buffer_shape(sdpa.graph.owning_module, k_cache)[2]
        window = _position_mask(mask, positions, capacity)
        users = list(sdpa.users)
        _require(len(users) == 1 and _is(users[0], aten.transpose.int), "the attention output is used elsewhere")
        merge = list(users[0].users)
        _require(len(merge) == 1 and _is(merge[0], aten.reshape.default, aten.view.default),
                 "the attention output is not merged back to (B, S, Hq*D)")
        chain += [users[0], merge[0]]
        return AttentionMatch(q, k, v, k_cache, v_cache, positions,
                              q_rope[1] if q_rope else None, q_rope[2] if q_rope else None,
                              num_heads, kv_num_heads, window, float(sdpa.kwargs.get("scale") or 0.0), merge[0],
                              chain)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        fused, rotary, notes = 0, 0, []
        for sdpa in [n for n in gm.graph.nodes if _is(n, aten.scaled_dot_product_attention.default)]:
            try:
                match = self.check(sdpa)
            except NoMatch as reason:
                notes.append(f"{sdpa.name}: {reason}")
                continue
            self._rewrite(gm.graph, sdpa, match)
            fused += 1
            rotary += match.cos is not None
        stats = {"fused_attention": fused, "with_rope": rotary} if fused else {}
        return PassResult(bool(fused), stats, tuple(notes))

    @staticmethod
    def _rewrite(graph: torch.fx.Graph, sdpa: Node, m: AttentionMatch) -> None:
        with graph.inserting_before(sdpa):
            fused = graph.call_function(torch.ops.agentopt.cached_attention.default, (
                m.q, m.k, m.v, m.k_cache, m.v_cache, m.positions, m.cos, m.sin, m.num_heads, m.kv_num_heads,
                m.window, m.scale, m.cos is not None))
            fused.meta["nn_module_stack"] = sdpa.meta.get("nn_module_stack", {})
            output = graph.call_function(operator.getitem, (fused, 0))
            new_k = graph.call_function(operator.getitem, (fused, 1))
            new_v = graph.call_function(operator.getitem, (fused, 2))
            graph.call_function(aten.copy_.default, (m.k_cache, new_k))  # write the caches back: BUFFER_MUTATION
            graph.call_function(aten.copy_.default, (m.v_cache, new_v))
        m.output.replace_all_uses_with(output)
        _erase_dead(graph, m.chain)


def _erase_dead(graph: torch.fx.Graph, candidates: list[Node]) -> None:
    """Erase matched nodes (and the shared mask/RoPE-row nodes they leave behind) once nothing uses them."""
    pending = set(candidates)
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            if not node.users:
                pending.discard(node)
                inputs = [a for a in node.all_input_nodes if a.op == "call_function"]
                graph.erase_node(node)
                pending.update(inputs)  # e.g. the mask and arange, once the last layer stops using them
                changed = True


def _buffer_shape(module: torch.nn.Module, node: Node) -> torch.Size:
    obj = module
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj.shape
