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
    softcap                                  > 0: scores become softcap * tanh(scores / softcap) before the
                                             softmax (Gemma 2 / Gemma 3 logit soft-capping)
    -> out (B, S, Hq*D), new k_cache, new v_cache
RoPE tables narrower than D (R < D columns: Phi-3's partial rotary) rotate the first R dims of each head only.
Passes and lowerings read the arguments by name through ``CachedAttentionArgs`` (never by position).
The caches' dtype is the attention's: with fp16 caches (``set_kv_cache_dtype``), q/k/v and the RoPE tables are cast
to fp16, RoPE, the cache write and attention run in fp16, and the output is cast back to q's dtype. With int8 caches
(``k_scale``/``v_scale`` (Hkv*D,) per-channel scales) the new K (after RoPE) and V are stored as round(x / scale)
and attention runs in q's dtype on codes * scale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, S, D) rotated by rows cos/sin (B, 1, S, R): the first R <= D dims (R < D: partial rotary)."""
    rotary = cos.shape[-1]
    if rotary == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    turned, kept = x[..., :rotary], x[..., rotary:]
    return torch.cat([turned * cos + _rotate_half(turned) * sin, kept], dim=-1)


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


def _attend(q, keys, values, mask, scale, softcap):
    """SDPA (keys/values already expanded to the query heads), with Gemma-style soft-capping when softcap > 0."""
    if not softcap:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale or None)
    scores = q @ keys.transpose(-1, -2) * (scale or q.shape[-1] ** -0.5)  # (B, Hq, S, T)
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ values


def _ring_attention(q, k, v, k_cache, v_cache, positions, window, sinks, scale, repeats, softcap=0.0):
    """Attend over (ring slots as they were) + (the new tokens), then store the new tokens into the ring."""
    b, hkv, s, d = k.shape
    ring = k_cache.shape[2] - sinks  # ring slots (>= window)
    length = positions[:, 0]  # (B,) tokens cached before this call (rows are contiguous)
    key_pos = torch.cat([ring_slot_positions(length, sinks, ring), positions], 1)[:, None, None, :]  # (B,1,1,C+S)
    query_pos = positions[:, None, :, None]  # (B, 1, S, 1)
    mask = (key_pos >= 0) & (key_pos <= query_pos) & ((key_pos > query_pos - window) | (key_pos < sinks))
    keys, values = torch.cat([k_cache, k], 2), torch.cat([v_cache, v], 2)  # (B, Hkv, C+S, D)
    out = _attend(q, keys.repeat_interleave(repeats, 1), values.repeat_interleave(repeats, 1), mask, scale, softcap)
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
                     ring: bool = False, dense_kv_heads: Optional[list[int]] = None, softcap: float = 0.0,
                     k_scale: Optional[torch.Tensor] = None, v_scale: Optional[torch.Tensor] = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, s, _ = q.shape
    d, capacity = k_cache.shape[-1], k_cache.shape[2]
    out_dtype = q.dtype
    quantized = k_cache.dtype == torch.int8  # int8 caches: attention runs in q's dtype on the dequantized caches
    if quantized and (k_scale is None or v_scale is None or ring):
        raise ValueError("int8 KV caches need k_scale and v_scale (set_kv_cache_dtype gives them), and no ring")
    if k_cache.dtype != q.dtype and not quantized:  # half-precision caches: attention runs in the cache dtype
        q, k, v = q.to(k_cache.dtype), k.to(k_cache.dtype), v.to(k_cache.dtype)
        cos, sin = (None if t is None else t.to(k_cache.dtype) for t in (cos, sin))
    positions = positions.expand(b, s)  # (B, S)
    q = q.view(b, s, num_heads, d).transpose(1, 2)  # (B, Hq, S, D)
    k = k.view(b, s, kv_num_heads, d).transpose(1, 2)  # (B, Hkv, S, D)
    v = v.view(b, s, kv_num_heads, d).transpose(1, 2)
    if rotary:
        c, sn = cos[positions][:, None], sin[positions][:, None]  # (B, 1, S, R)
        q, k = _rope(q, c, sn), _rope(k, c, sn)
    repeats = num_heads // kv_num_heads
    if ring:
        out, k_cache, v_cache = _ring_attention(q, k, v, k_cache, v_cache, positions, window, sinks, scale, repeats,
                                                softcap)
        return out.transpose(1, 2).reshape(b, s, num_heads * d).to(out_dtype), k_cache, v_cache
    index = positions[:, None, :, None].expand(b, kv_num_heads, s, d)  # (B, Hkv, S, D)
    if quantized:  # K after RoPE and V stored as int8 codes, read back through their scales
        k_cache = k_cache.scatter(2, index, quantize_kv(k, k_scale))  # (B, Hkv, T, D) int8
        v_cache = v_cache.scatter(2, index, quantize_kv(v, v_scale))
        keys, values = dequantize_kv(k_cache, k_scale, q.dtype), dequantize_kv(v_cache, v_scale, q.dtype)
    else:
        k_cache = k_cache.scatter(2, index, k)  # (B, Hkv, T, D)
        v_cache = v_cache.scatter(2, index, v)
        keys, values = k_cache, v_cache
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
    out = _attend(q, keys.repeat_interleave(repeats, 1), values.repeat_interleave(repeats, 1), mask, scale,
                  softcap)  # (B, Hq, S, D)
    return out.transpose(1, 2).reshape(b, s, num_heads * d).to(out_dtype), k_cache, v_cache


def quantize_kv(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (B, Hkv, S, D) -> int8 codes round(x / scale) clipped to [-128, 127], ``scale`` (Hkv*D,) per channel: what
    ORT's GroupQueryAttention computes with k_quant_type / v_quant_type PER_CHANNEL (both round half to even)."""
    step = scale.view(1, x.shape[1], 1, x.shape[3])
    return torch.clamp(torch.round(x / step), -128, 127).to(torch.int8)


def dequantize_kv(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return codes.to(dtype) * scale.view(1, codes.shape[1], 1, codes.shape[3]).to(dtype)


@cached_attention.register_fake
def _(q, k, v, k_cache, v_cache, positions, cos, sin, num_heads, kv_num_heads, window=-1, scale=0.0,
      rotary=False, sinks=0, stride=0, ring=False, dense_kv_heads=None, softcap=0.0, k_scale=None, v_scale=None):
    return torch.empty_like(q), torch.empty_like(k_cache), torch.empty_like(v_cache)


_SCHEMA = torch.ops.agentopt.cached_attention.default._schema


@dataclass
class CachedAttentionArgs:
    """One ``agentopt::cached_attention`` call's arguments by name, in the op's schema order: what passes change
    (``insert_sparse_attention`` sets window/sinks/ring, ``set_kv_cache_dtype`` reads the caches) and lowerings
    read, so that no code indexes the op's arguments by position.

        args = CachedAttentionArgs.of(node); args.window = 1024; args.write_to(node)
    """

    q: Any
    k: Any
    v: Any
    k_cache: Any
    v_cache: Any
    positions: Any
    cos: Any = None
    sin: Any = None
    num_heads: int = 1
    kv_num_heads: int = 1
    window: int = -1
    scale: float = 0.0
    rotary: bool = False
    sinks: int = 0
    stride: int = 0
    ring: bool = False
    dense_kv_heads: Optional[list[int]] = None
    softcap: float = 0.0
    k_scale: Any = None  # int8 caches: per-channel scales (Hkv*D,) of K (after RoPE) and V (set_kv_cache_dtype)
    v_scale: Any = None

    @classmethod
    def of(cls, node: torch.fx.Node) -> "CachedAttentionArgs":
        """The arguments of a fused-attention FX node (positional or keyword, defaults filled in)."""
        names = [a.name for a in _SCHEMA.arguments]
        values = dict(zip(names, node.args))
        values.update(node.kwargs)
        return cls(**{k: v for k, v in values.items()
                      if v is not None or k in ("cos", "sin", "dense_kv_heads", "k_scale", "v_scale")})

    def to_args(self) -> tuple:
        return tuple(getattr(self, a.name) for a in _SCHEMA.arguments)

    def write_to(self, node: torch.fx.Node) -> None:
        node.args, node.kwargs = self.to_args(), {}

    def pattern(self) -> dict:
        """The layer's attention pattern as the manifest records it."""
        pattern = {"window": self.window if self.window > 0 else 0, "sinks": self.sinks, "stride": self.stride,
                   "ring": bool(self.ring)}
        if self.dense_kv_heads:
            pattern["dense_kv_heads"] = list(self.dense_kv_heads)
        if self.softcap:
            pattern["softcap"] = self.softcap
        return pattern


assert [f.name for f in dataclasses.fields(CachedAttentionArgs)] == [a.name for a in _SCHEMA.arguments]
