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
    scale                                    softmax scale; 0 means 1/sqrt(D)
    -> out (B, S, Hq*D), new k_cache, new v_cache
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


@torch.library.custom_op("agentopt::cached_attention", mutates_args=())
def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, positions: torch.Tensor, cos: Optional[torch.Tensor],
                     sin: Optional[torch.Tensor], num_heads: int, kv_num_heads: int, window: int = -1,
                     scale: float = 0.0, rotary: bool = False, sinks: int = 0,
                     stride: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, s, _ = q.shape
    d, capacity = k_cache.shape[-1], k_cache.shape[2]
    positions = positions.expand(b, s)  # (B, S)
    q = q.view(b, s, num_heads, d).transpose(1, 2)  # (B, Hq, S, D)
    k = k.view(b, s, kv_num_heads, d).transpose(1, 2)  # (B, Hkv, S, D)
    v = v.view(b, s, kv_num_heads, d).transpose(1, 2)
    if rotary:
        c, sn = cos[positions][:, None], sin[positions][:, None]  # (B, 1, S, D)
        q, k = q * c + _rotate_half(q) * sn, k * c + _rotate_half(k) * sn
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
        mask = mask & visible
    repeats = num_heads // kv_num_heads
    out = F.scaled_dot_product_attention(q, k_cache.repeat_interleave(repeats, 1),
                                         v_cache.repeat_interleave(repeats, 1), attn_mask=mask,
                                         scale=scale or None)  # (B, Hq, S, D)
    return out.transpose(1, 2).reshape(b, s, num_heads * d), k_cache, v_cache


@cached_attention.register_fake
def _(q, k, v, k_cache, v_cache, positions, cos, sin, num_heads, kv_num_heads, window=-1, scale=0.0,
      rotary=False, sinks=0, stride=0):
    return torch.empty_like(q), torch.empty_like(k_cache), torch.empty_like(v_cache)
