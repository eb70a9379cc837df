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

Matches our reference decoder, unmodified transformers modules (models/transformers_decoder.py) and plain-SDPA
models with an index-copy cache:
  * attention as SDPA or written out as transformers' eager attention, soft-capped scores included (Gemma 2:
    ``tanh(s / c) * c``, carried as the op's ``softcap``; attention_cores.py);
  * RoPE or none (SmolLM3's no-RoPE layers), rotate_half by ``chunk`` or by slices, on all of a head's dims or the
    first R (Phi-3's partial rotary: ``cat(rope(x[..., :R]), x[..., R:])``), tables indexed by position;
  * q/k/v from their projections, from slices of a fused qkv projection (Phi-3), or from per-head ops before or
    after the head transpose (Qwen3 / Gemma 3 QK-norm; the op then reads a flattened copy);
  * cache writes by ``scatter_`` at per-row positions (B, S), or ``index_copy_`` / ``index_put_``
    (``cache[:, :, pos] = k``) at shared positions (S,);
  * heads expanded by ``repeat_interleave`` or transformers' ``expand`` + ``reshape`` (or not at all for MHA);
  * a mask ``arange(T) <= pos`` (broadcast as key index against query position), optionally
    ``& arange(T) > pos - W`` (sliding window, per layer).
It does not fire — and says why in the pass notes — when the attention is not causal over positions (another
mask, ``is_causal``, dropout), or a cache is read anywhere else; the compile then refuses the graph rather than
ship attention that copies its caches every step.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch

from ..capture.custom_ops import CachedAttentionArgs
from .attention_cores import NoMatch, attention_core, candidates
from .attention_cores import is_call as _is
from .attention_cores import require as _require
from .infra import GraphPass, PassResult

aten = torch.ops.aten
Node = torch.fx.Node


@dataclass
class AttentionMatch:
    q: "Node | Flatten"  # (B, S, Hq*D) projections, before the head split (or per-head values to flatten)
    k: "Node | Flatten"
    v: "Node | Flatten"
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
    softcap: float = 0.0
    anchor: Node | None = None  # the attention's last node: the fused op goes before it


@dataclass(frozen=True)
class Flatten:
    """A per-head tensor the fused op takes as (B, S, H*D): (B, S, H, D), or (B, H, S, D) when ``heads_first``; a
    (transpose and) flatten is inserted at the rewrite. Such tensors come from per-head ops: Qwen3 normalizes each
    head before the head transpose, Gemma 3 after it, so no (B, S, H*D) tensor exists in the graph to read."""

    heads: Node
    heads_first: bool = False


def _split_heads(node: Node, chain: list[Node]) -> tuple[Node | Flatten, int, int]:
    """transpose(x4, 1, 2) with x4 (B, S, H, D) -> (x, H, D): x is the projection when x4 = view(projection)
    (B, S, H*D), else ``Flatten(x4)`` (Qwen3 / Gemma 3 normalize each head of q and k before the transpose)."""
    shape = _shape(node)
    _require(shape is not None and len(shape) == 4 and isinstance(shape[1], int) and isinstance(shape[3], int),
             f"{node.name} is not a (B, H, S, D) tensor")
    if not (_is(node, aten.transpose.int) and sorted(node.args[1:3]) == [1, 2]):
        # computed per head after the head split (Gemma 3's QK-norm): SDPA and the cache layout say it is (B, H, S, D)
        return Flatten(node, heads_first=True), shape[1], shape[3]
    x4 = node.args[0]
    shape = _shape(x4)
    _require(shape is not None and len(shape) == 4, f"{x4.name} is not a (B, S, H, D) tensor")
    heads, head_dim = shape[2], shape[3]
    _require(isinstance(heads, int) and isinstance(head_dim, int), "head count or head dim is symbolic")
    chain.append(node)
    source = _shape(x4.args[0]) if _is(x4, aten.view.default, aten.reshape.default, aten._unsafe_view.default) \
        else None
    if source is not None and len(source) == 3 and source[2] == heads * head_dim:
        chain.append(x4)
        return x4.args[0], heads, head_dim
    return Flatten(x4), heads, head_dim


def _shape(node) -> tuple | None:
    val = node.meta.get("val") if isinstance(node, Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _rope(node: Node, chain: list[Node]) -> tuple[Node, Node, Node, Node] | None:
    """x * cos[pos] + cat(-x2, x1) * sin[pos] -> (x, cos_table, sin_table, pos); None if ``node`` is no RoPE.
    Also partial rotary (Phi-3): cat(rope(x[..., :R]), x[..., R:]) -> (x, (T, R) tables, ...)."""
    if _is(node, aten.cat.default) and len(node.args[0]) == 2 and _last_dim(node, node.args[1:2]):
        turned, kept = node.args[0]
        inner: list[Node] = []
        found = _rope(turned, inner)
        if found is not None and _is(found[0], aten.slice.Tensor) and _is(kept, aten.slice.Tensor):
            x, rotary = found[0].args[0], _shape(found[0])[-1]
            if (_slice_of(found[0], x, 0, rotary) and _slice_of(kept, x, rotary, _shape(x)[-1])
                    and _shape(found[1])[-1] == rotary):
                chain += [node, kept, found[0], *inner]
                return (x, *found[1:])
        return None
    if not _is(node, aten.add.Tensor) or len(node.args) != 2:
        return None
    for plain, rotated in (node.args, node.args[::-1]):
        if not (_is(plain, aten.mul.Tensor) and _is(rotated, aten.mul.Tensor)):
            continue
        for x, cos_rows in (plain.args, plain.args[::-1]):
            for half, sin_rows in (rotated.args, rotated.args[::-1]):
                cos_rows, sin_rows = _through_reshapes(cos_rows, chain), _through_reshapes(sin_rows, chain)
                if not (_is(cos_rows, aten.index.Tensor) and _is(sin_rows, aten.index.Tensor)):
                    continue
                halves = _rotate_half_of(half, x)
                if halves is None:
                    continue
                positions = cos_rows.args[1][0]
                if sin_rows.args[1][0] is not positions:
                    continue
                chain += [node, plain, rotated, *halves, cos_rows, sin_rows]
                return x, cos_rows.args[0], sin_rows.args[0], positions
    return None


def _rotate_half_of(half: Node, x: Node) -> list[Node] | None:
    """The nodes of ``cat(-x2, x1)`` where x1, x2 are x's halves along the last axis (``chunk(x, 2, -1)`` or
    Hugging Face's ``x[..., :D/2]``, ``x[..., D/2:]``); None if ``half`` is not that."""
    if not (_is(half, aten.cat.default) and len(half.args[0]) == 2 and _last_dim(half, half.args[1:2])):
        return None
    neg, first = half.args[0]
    if not _is(neg, aten.neg.default):
        return None
    second = neg.args[0]
    if _is(first, operator.getitem) and _is(second, operator.getitem):  # chunk(x, 2, -1)
        chunk = first.args[0]
        if (second.args[0] is chunk and _is(chunk, aten.chunk.default) and chunk.args[0] is x
                and first.args[1] == 0 and second.args[1] == 1):
            return [half, neg, first, second, chunk]
        return None
    width = (_shape(x) or (None,))[-1]
    if isinstance(width, int) and width % 2 == 0 and _is(first, aten.slice.Tensor) and _is(second, aten.slice.Tensor) \
            and _slice_of(first, x, 0, width // 2) and _slice_of(second, x, width // 2, width):
        return [half, neg, first, second]
    return None


def _last_dim(node: Node, dim_args) -> bool:
    """Whether a cat / slice's dim argument (default 0) names the last axis of its 4-D result."""
    dim = dim_args[0] if dim_args else 0
    rank = len(_shape(node) or ())
    return dim == -1 or (rank > 0 and dim == rank - 1)


def _slice_of(node: Node, x: Node, start: int, end: int) -> bool:
    """node is x[..., start:end] (an aten.slice on the last axis; an end past the axis counts as its length)."""
    if not (_is(node, aten.slice.Tensor) and node.args[0] is x and _last_dim(node, node.args[1:2])):
        return False
    args = list(node.args) + [None, None, None]
    width = (_shape(x) or (None,))[-1]
    begin, stop = args[2] or 0, args[3]
    stop = width if stop is None or (isinstance(width, int) and stop >= width) else stop
    return begin == start and stop == end and (args[4] or 1) == 1


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

    def check(self, candidate: Node) -> AttentionMatch:
        """The match for one SDPA node or eager softmax, or NoMatch with the reason it is not fusable."""
        core = attention_core(candidate)
        query, key, value, mask = core.query, core.key, core.value, core.mask
        _require(not core.is_causal, "is_causal attention over a cache")
        _require(not core.dropout, "attention with dropout")
        _require(isinstance(mask, Node), "attention without a mask is not causal over positions")
        chain: list[Node] = list(core.nodes)
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
        capacity = capacity if capacity is not None else _buffer_shape(candidate.graph.owning_module, k_cache)[2]
        window = _position_mask(mask, positions, capacity)
        output = _through_same_shape_views(core.output, chain)  # HF reshapes SDPA's output to the shape it has
        users = list(output.users)
        _require(len(users) == 1 and _is(users[0], aten.transpose.int), "the attention output is used elsewhere")
        merge = list(users[0].users)
        _require(len(merge) == 1 and _is(merge[0], aten.reshape.default, aten.view.default),
                 "the attention output is not merged back to (B, S, Hq*D)")
        chain += [users[0], merge[0]]
        return AttentionMatch(q, k, v, k_cache, v_cache, positions,
                              q_rope[1] if q_rope else None, q_rope[2] if q_rope else None,
                              num_heads, kv_num_heads, window, core.scale, merge[0], chain, core.softcap, core.output)

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        fused, rotary, notes = 0, 0, []
        softcapped = 0
        for candidate in candidates(gm.graph):
            try:
                match = self.check(candidate)
            except NoMatch as reason:
                notes.append(f"{candidate.name}: {reason}")
                continue
            self._rewrite(gm.graph, match)
            fused += 1
            rotary += match.cos is not None
            softcapped += bool(match.softcap)
        stats = {"fused_attention": fused, "with_rope": rotary} if fused else {}
        if softcapped:
            stats["softcapped"] = softcapped
        return PassResult(bool(fused), stats, tuple(notes))

    @staticmethod
    def _rewrite(graph: torch.fx.Graph, m: AttentionMatch) -> None:
        with graph.inserting_before(m.anchor):
            q, k, v = (_flattened(graph, x) for x in (m.q, m.k, m.v))  # (B, S, H*D)
            fused = graph.call_function(torch.ops.agentopt.cached_attention.default, CachedAttentionArgs(
                q, k, v, m.k_cache, m.v_cache, m.positions, m.cos, m.sin, m.num_heads, m.kv_num_heads, m.window,
                m.scale, m.cos is not None, softcap=m.softcap).to_args())
            fused.meta["nn_module_stack"] = m.anchor.meta.get("nn_module_stack", {})
            output = graph.call_function(operator.getitem, (fused, 0))
            new_k = graph.call_function(operator.getitem, (fused, 1))
            new_v = graph.call_function(operator.getitem, (fused, 2))
            graph.call_function(aten.copy_.default, (m.k_cache, new_k))  # write the caches back: BUFFER_MUTATION
            graph.call_function(aten.copy_.default, (m.v_cache, new_v))
        m.output.replace_all_uses_with(output)
        _erase_dead(graph, m.chain)


def _flattened(graph: torch.fx.Graph, x: "Node | Flatten") -> Node:
    if not isinstance(x, Flatten):
        return x
    heads = graph.call_function(aten.transpose.int, (x.heads, 1, 2)) if x.heads_first else x.heads  # (B, S, H, D)
    return graph.call_function(aten.flatten.using_ints, (heads, 2))


def _through_same_shape_views(node: Node, chain: list[Node]) -> Node:
    """Follow a chain of single-use reshapes/views that keep the shape (no-ops) down from ``node``."""
    while len(node.users) == 1:
        user = next(iter(node.users))
        if not (_is(user, aten.reshape.default, aten.view.default) and _shape(user) == _shape(node)):
            break
        chain.append(user)
        node = user
    return node


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
