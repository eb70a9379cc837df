"""Our custom ops (namespace ``agentopt``), the opaque nodes that graph passes insert and backends lower.

``agentopt::cached_attention`` is RoPE + KV-cache write + grouped-query attention in one *functional* op: it returns
the attention output and the updated caches, and the graph writes the caches back with ``copy_`` (a mutating op
would reach torch.onnx as ``auto_functionalized``, which it cannot lower). Its eager implementation below is the
reference semantics every lowering is checked against.

    q (B, S, Hq*D), k/v (B, S, Hkv*D)        new tokens, heads packed (the layout of the q/k/v projections)
    k_cache/v_cache (B, Hkv, T, D)           fixed-capacity caches; row p holds the token at position p
    positions (B, S) or (S,)                 each row's positions of its new tokens (contiguous, after its cached
                                             ones); (S,) means the same positions for every row
    cos/sin (L, D) or None                   RoPE tables in half-rotation layout, applied to q and k when rotary
    window                                   > 0: a query at p sees keys p-window < j <= p (itself included)
    sinks                                    > 0 (with a window): keys j < sinks stay visible too (StreamingLLM)
    stride                                   > 0 (with a window): keys with (p - j) % stride == 0 stay visible too
                                             (Sparse-Transformer strided pattern)
    ring                                     the caches are rings, not full-length: S sink slots, then R >= window
                                             ring slots (R = T - sinks); memory and work per step stay bounded
                                             however long the session runs
    dense_kv_heads                           KV heads (and the query heads sharing them) that ignore the pattern
                                             and attend densely: per-head patterns (retrieval vs streaming heads)
    scale                                    softmax scale; 0 means 1/sqrt(D)
    -> out (B, S, Hq*D), new k_cache, new v_cache
The caches' dtype is the attention's: with fp16 caches (``set_kv_cache_dtype``), q/k/v and the RoPE tables are cast
to fp16, RoPE, the cache write and attention run in fp16, and the output is cast back to q's dtype.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def ring_slot_positions(length: torch.Tensor, sinks: int, ring: int) -> torch.Tensor:
    """Position held by each of the sinks + ring slots after ``length`` (B,) tokens; -1 where empty.

    Position p lives in slot p if p < sinks, else in slot sinks + (p - sinks) % ring; a slot holds the latest
    position that maps to it: for ring slot r that is sinks + r + ring * floor((length - 1 - sinks - r) / ring).
    A ring longer than the window (spare slots) keeps a few positions that are already out of every later query's
    window: tokens written past the conversation's end (drafts it steps back over, batch padding) land only there.
    """
    slots = torch.arange(sinks + ring, device=length.device)  # (C,)
    last = length[:, None] - 1  # (B, 1) position of the newest token
    index = slots - sinks  # (C,) ring index (negative for sink slots)
    newest = sinks + index + ring * torch.div(last - sinks - index, ring, rounding_mode="floor")  # (B, C)
    position = torch.where(slots < sinks, slots.expand_as(newest), newest)
    filled = (position <= last) & ((slots < sinks) | (position >= sinks))  # a ring slot never holds a sink
    return torch.where(filled, position, torch.full_like(position, -1))


def _ring_attention(q, k, v, k_cache, v_cache, positions, window, sinks, scale, repeats):
    """Attend over (ring slots as they were) + (the new tokens), then store the new tokens into the ring."""
    b, hkv, s, d = k.shape
    ring = k_cache.shape[2] - sinks  # ring slots (>= window)
    length = positions[:, 0]  # (B,) tokens cached before this call (rows are contiguous)
    key_pos = torch.cat([ring_slot_positions(length, sinks, ring), positions], 1)[:, None, None, :]  # (B,1,1,C+S)
    query_pos = positions[:, None, :, None]  # (B, 1, S, 1)
    mask = (key_pos >= 0) & (key_pos <= query_pos) & ((key_pos > query_pos - window) | (key_pos < sinks))
    keys, values = torch.cat([k_cache, k], 2), torch.cat([v_cache, v], 2)  # (B, Hkv, C+S, D)
    out = F.scaled_dot_product_attention(q, keys.repeat_interleave(repeats, 1), values.repeat_interleave(repeats, 1),
                                         attn_mask=mask, scale=scale or None)
    # each slot takes the newest new token that maps to it (duplicates within a long chunk resolve to the newest)
    held = ring_slot_positions(length + s, sinks, ring)  # (B, C)
    from_chunk = (held >= length[:, None])[:, None, :, None]  # (B, 1, C, 1)
    index = (held - length[:, None]).clamp(0, s - 1)[:, None, :, None].expand(b, hkv, -1, d)  # (B, Hkv, C, D)
    k_cache = torch.where(from_chunk, k.gather(2, index), k_cache)
    v_cache = torch.where(from_chunk, v.gather(2, index), v_cache)
    return out, k_cache, v_cache


@torch.library.custom_op("agentopt::cached_attention", mutates_args=())
def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, positions: torch.Tensor, cos: Optional[torch.Tensor],
                     sin: Optional[torch.Tensor], num_heads: int, kv_num_heads: int, window: int = -1,
                     scale: float = 0.0, rotary: bool = False, sinks: int = 0, stride: int = 0,
                     ring: bool = False, dense_kv_heads: Optional[list[int]] = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, s, _ = q.shape
    d, capacity = k_cache.shape[-1], k_cache.shape[2]
    out_dtype = q.dtype
    if k_cache.dtype != q.dtype:  # half-precision caches: attention runs in the cache dtype
        q, k, v = q.to(k_cache.dtype), k.to(k_cache.dtype), v.to(k_cache.dtype)
        cos, sin = (None if t is None else t.to(k_cache.dtype) for t in (cos, sin))
    positions = positions.expand(b, s)  # (B, S)
    q = q.view(b, s, num_heads, d).transpose(1, 2)  # (B, Hq, S, D)
    k = k.view(b, s, kv_num_heads, d).transpose(1, 2)  # (B, Hkv, S, D)
    v = v.view(b, s, kv_num_heads, d).transpose(1, 2)
    if rotary:
        c, sn = cos[positions][:, None], sin[positions][:, None]  # (B, 1, S, D)
        q, k = q * c + _rotate_half(q) * sn, k * c + _rotate_half(k) * sn
    repeats = num_heads // kv_num_heads
    if ring:
        out, k_cache, v_cache = _ring_attention(q, k, v, k_cache, v_cache, positions, window, sinks, scale, repeats)
        return out.transpose(1, 2).reshape(b, s, num_heads * d).to(out_dtype), k_cache, v_cache
    index = positions[:, None, :, None].expand(b, kv_num_heads, s, d)  # (B, Hkv, S, D)
    k_cache = k_cache.scatter(2, index, k)  # (B, Hkv, T, D)
    v_cache = v_cache.scatter(2, index, v)
    key_pos = torch.arange(capacity, device=q.device)  # (T,)
    query_pos = positions[:, None, :, None]  # (B, 1, S, 1)
    mask = key_pos <= query_pos  # (B, 1, S, T)
    if window > 0:
        visible = key_pos > query_pos - window
        if sinks > 0:
            visible = visible | (key_pos < sinks)
        if stride > 0:
            visible = visible | ((query_pos - key_pos) % stride == 0)
        if dense_kv_heads:  # (1, Hq, 1, 1): query head i reads KV head i // repeats
            kv_head = torch.arange(num_heads, device=q.device) // repeats
            dense = torch.isin(kv_head, torch.tensor(dense_kv_heads, device=q.device))
            visible = visible | dense[None, :, None, None]
        mask = mask & visible  # (B, 1 or Hq, S, T)
    out = F.scaled_dot_product_attention(q, k_cache.repeat_interleave(repeats, 1),
                                         v_cache.repeat_interleave(repeats, 1), attn_mask=mask,
                                         scale=scale or None)  # (B, Hq, S, D)
    return out.transpose(1, 2).reshape(b, s, num_heads * d).to(out_dtype), k_cache, v_cache


@cached_attention.register_fake
def _(q, k, v, k_cache, v_cache, positions, cos, sin, num_heads, kv_num_heads, window=-1, scale=0.0,
      rotary=False, sinks=0, stride=0, ring=False, dense_kv_heads=None):
    return torch.empty_like(q), torch.empty_like(k_cache), torch.empty_like(v_cache)
