"""Lowerings of ``agentopt::cached_attention`` to ONNX, selected by ``attention_impl``.

``gqa`` (default): ORT's ``com.microsoft.GroupQueryAttention``
    GroupQueryAttention(q, k, v, past_key, past_value, seqlens_k, total_len, cos[:T, :D/2], sin[:T, :D/2])
        -> out, present_key, present_value
    The caches keep their capacity T (present has past's shape), the new rows are written at
    [pos0, pos0 + S), RoPE is applied inside (``do_rotary``), and a sliding window is ``local_window_size=W``
    (W keys including the query: the same convention as our op). Layers with attention sinks, a strided
    pattern or per-head patterns (some KV heads dense), which GQA cannot express, take the standard lowering below
    instead (recorded in the manifest).
    Bound to one buffer as past and present, the cache is updated in place; attention work grows with the
    tokens cached, not with T.

``standard``: standard ONNX only (opset 23), for execution providers without Microsoft contrib ops and for TensorRT
    q4 = Transpose(Reshape(q)) ; RoPE with Gather(cos, pos) + Split/Neg/Concat
    new_cache = ScatterND(cache, indices[b, h, s] = (b, h, pos[b, s]), k4)    # no full-cache transposes
    out = Attention(q4, new_k, new_v, mask[b, s, t] = t <= pos[b, s]
                                                  & (no window | t > pos[b, s] - W | t < sinks
                                                     | (pos[b, s] - t) % stride == 0 | head h is dense))
    It is exact but attends over all T slots each step (masked), so it is O(T) per step on ORT CPU.
    Ring caches (bounded sparse layers): ScatterND stores each new token in its slot (in place), then Attention
    over the C = sinks + R ring slots, whose positions are computed from the row's length: O(C) per call, whatever
    the context. Exact for calls of up to R - window + 1 tokens; sessions split longer ones.
"""

from __future__ import annotations

import onnxscript
from onnxscript import opset23 as op

from .contrib_schemas import register_ort_contrib_schema

INT32, FLOAT, INT8 = 6, 1, 3  # onnx.TensorProto.INT32, FLOAT, INT8
_INT64_MAX = 2**63 - 1
msft = onnxscript.values.Opset("com.microsoft", 1)


def _in_cache_dtype(k_cache, *values):
    """Half-precision caches (set_kv_cache_dtype): attention runs in the caches' dtype, so cast its fp32 inputs.
    Returns (cast values..., whether the output must be cast back to fp32)."""
    dtype = k_cache.dtype
    if dtype is None or dtype.name in ("FLOAT", "INT8"):  # int8 caches: attention runs in fp32 on scaled codes
        return (*values, False)
    return (*(None if v is None else op.Cast(v, to=dtype.value) for v in values), True)


def _static_dim(value, axis: int) -> int:
    dim = value.shape[axis]
    if not isinstance(dim, int):
        raise ValueError(f"dimension {axis} of {value.name} must be static, got {dim}")
    return dim


def _is_int8(cache) -> bool:
    return cache.dtype is not None and cache.dtype.name == "INT8"


def cached_attention_to_gqa(q, k, v, k_cache, v_cache, positions, cos=None, sin=None, num_heads=1, kv_num_heads=1,
                            window=-1, scale=0.0, rotary=False, sinks=0, stride=0, ring=False, dense_kv_heads=None,
                            softcap=0.0, k_scale=None, v_scale=None):
    if sinks > 0 or stride > 0 or ring or dense_kv_heads:  # not expressible with GQA: standard-op lowering
        return cached_attention_to_standard(q, k, v, k_cache, v_cache, positions, cos, sin, num_heads, kv_num_heads,
                                            window, scale, rotary, sinks, stride, ring, dense_kv_heads, softcap,
                                            k_scale, v_scale)
    capacity, head_dim = _static_dim(k_cache, 2), _static_dim(k_cache, 3)
    rotary_dim = _static_dim(cos, 1) if rotary else 0  # R = D, or fewer for partial rotary (the first R dims)
    if rotary and (rotary_dim // 2) % 8:  # ORT's kernel takes R/2 in multiples of 8 only: rotate before the op
        rows_cos, rows_sin = (op.Unsqueeze(op.Gather(t, positions, axis=0), [-2]) for t in (cos, sin))  # (B,S,1,R)
        q = op.Reshape(_rotate(op.Reshape(q, [0, 0, num_heads, head_dim]), rows_cos, rows_sin, rotary_dim,
                               head_dim), [0, 0, num_heads * head_dim])
        k = op.Reshape(_rotate(op.Reshape(k, [0, 0, kv_num_heads, head_dim]), rows_cos, rows_sin, rotary_dim,
                               head_dim), [0, 0, kv_num_heads * head_dim])
        rotary = False
    if rotary:  # GQA reads (positions, R/2) tables and no position reaches the capacity: the rest is folded away
        cos = op.Slice(cos, [0, 0], [capacity, rotary_dim // 2], [0, 1])  # (C, R/2)
        sin = op.Slice(sin, [0, 0], [capacity, rotary_dim // 2], [0, 1])
    q, k, v, cos, sin, cast_back = _in_cache_dtype(k_cache, q, k, v, cos, sin)
    if len(positions.shape) == 2:  # (B, S): each row's own positions
        last = op.Squeeze(op.Slice(positions, [-1], [_INT64_MAX], [1]), [1])  # (B,) last new position per row
    else:  # (S,): shared by all rows
        last = op.Expand(op.Slice(positions, [-1], [_INT64_MAX]), op.Shape(q, start=0, end=1))  # (B,)
    seqlens_k = op.Cast(last, to=INT32)  # (B,) int32: tokens in the row's cache after this call, minus 1
    total = op.Cast(op.Add(op.ReduceMax(last, keepdims=0), 1), to=INT32)  # () int32: the longest row
    attributes = {"num_heads": num_heads, "kv_num_heads": kv_num_heads, "local_window_size": window if window > 0
                  else -1, "do_rotary": int(rotary), "rotary_interleaved": 0}
    if scale:
        attributes["scale"] = scale
    if softcap:
        attributes["softcap"] = softcap
    scales = ()
    if _is_int8(k_cache):  # ORT >= 1.2x CPU: int8 caches, quantized on write and read with per-channel scales
        attributes.update(k_quant_type="PER_CHANNEL", v_quant_type="PER_CHANNEL", kv_cache_bit_width=8)
        scales = (None, None, None, k_scale, v_scale)  # position_ids, attention_bias, head_sink, k_scale, v_scale
    # the tracer materializes all four schema outputs; the unused output_qk is trimmed after export
    outputs = msft.GroupQueryAttention(q, k, v, k_cache, v_cache, seqlens_k, total, cos if rotary else None,
                                       sin if rotary else None, *scales, **attributes)
    out = op.Cast(outputs[0], to=FLOAT) if cast_back else outputs[0]
    return out, outputs[1], outputs[2]


def _rotate(x4, cos_rows, sin_rows, rotary_dim: int, head_dim: int):
    # x * cos + cat(-x2, x1) * sin on the first R dims, x4 (B, H, S, D), rows (.., S, R); the other D - R pass
    turned = x4 if rotary_dim == head_dim else op.Slice(x4, [0], [rotary_dim], [3])
    x1, x2 = op.Split(turned, axis=-1, num_outputs=2)
    rotated = op.Add(op.Mul(turned, cos_rows), op.Mul(op.Concat(op.Neg(x2), x1, axis=-1), sin_rows))
    if rotary_dim == head_dim:
        return rotated
    return op.Concat(rotated, op.Slice(x4, [rotary_dim], [head_dim], [3]), axis=-1)


def _rows_positions(positions):
    """(B, S) positions as (B, 1, S) or (S,) shared positions as (1, 1, S), ready to broadcast over heads."""
    return op.Unsqueeze(positions, [1]) if len(positions.shape) == 2 else op.Unsqueeze(positions, [0, 1])


def _scatter_indices(new4, rows_positions):
    """(B, H, S, 3) int64 indices (b, h, pos[b, s]) for ScatterND of new4 (B, H, S, D) into a (B, H, T, D) cache;
    rows_positions (B or 1, 1, S)."""
    shape = op.Shape(new4, start=0, end=3)  # (B, H, S)
    b = op.Expand(op.Unsqueeze(op.Range(0, op.Squeeze(op.Shape(new4, start=0, end=1)), 1), [1, 2]), shape)
    h = op.Expand(op.Unsqueeze(op.Range(0, op.Squeeze(op.Shape(new4, start=1, end=2)), 1), [0, 2]), shape)
    p = op.Expand(rows_positions, shape)
    return op.Concat(op.Unsqueeze(b, [3]), op.Unsqueeze(h, [3]), op.Unsqueeze(p, [3]), axis=3)


def _ring_slot_positions(length, capacity: int, sinks: int):
    """(B, C) position held by each ring slot after ``length`` (B, 1) tokens, -1 where empty (see custom_ops.py)."""
    ring = capacity - sinks  # ring slots (the window plus spare slots)
    slots = op.Range(0, capacity, 1)  # (C,)
    last = op.Sub(length, 1)  # (B, 1)
    index = op.Sub(slots, sinks)  # (C,)
    behind = op.Sub(op.Sub(last, sinks), index)  # (B, C)
    floor_div = op.Div(op.Sub(behind, op.Mod(behind, ring)), ring)  # exact floor division (Mod has the
    newest = op.Add(op.Add(index, sinks), op.Mul(floor_div, ring))  # divisor's sign, so behind - mod is a multiple)
    is_sink = op.Less(slots, sinks)
    position = op.Where(is_sink, op.Expand(slots, op.Shape(newest)), newest)
    filled = op.And(op.LessOrEqual(position, last), op.Or(is_sink, op.GreaterOrEqual(position, sinks)))
    return op.Where(filled, position, -1)


def _ring_attention(q4, k4, v4, k_cache, v_cache, positions, window, sinks, attributes):
    """Store the new rows in their slots (in place), then attend over the ring. Exact for calls of at most
    R - window + 1 tokens (R = C - sinks ring slots), which sessions guarantee by splitting longer calls
    (``ring_call_tokens`` in the manifest): a token written by the call overwrites the position R before it, and
    every query of the call still needs only positions after that one. Reading the ring after the store also means
    no copy of it: the attention reads the cache buffer itself."""
    capacity = _static_dim(k_cache, 2)
    ring = capacity - sinks
    in_ring = op.GreaterOrEqual(positions, sinks)  # (B, S)
    slot = op.Where(in_ring, op.Add(op.Mod(op.Sub(positions, sinks), ring), sinks), positions)  # (B, S)
    indices = _scatter_indices(k4, op.Unsqueeze(slot, [1]))  # distinct slots: a call is shorter than the ring
    new_k, new_v = op.ScatterND(k_cache, indices, k4), op.ScatterND(v_cache, indices, v4)
    after = op.Add(op.Slice(positions, [-1], [_INT64_MAX], [1]), 1)  # (B, 1) tokens cached after this call
    keys_at = op.Unsqueeze(_ring_slot_positions(after, capacity, sinks), [1, 2])  # (B, 1, 1, C)
    queries_at = op.Unsqueeze(positions, [1, 3])  # (B, 1, S, 1)
    visible = op.Or(op.Greater(keys_at, op.Sub(queries_at, window)), op.Less(keys_at, sinks))
    mask = op.And(op.And(op.GreaterOrEqual(keys_at, 0), op.LessOrEqual(keys_at, queries_at)), visible)
    return op.Attention(q4, new_k, new_v, mask, **attributes)[0], new_k, new_v


def _dense_heads(num_heads: int, kv_num_heads: int, dense_kv_heads):
    """(1, Hq, 1, 1) bool: True for the query heads whose KV head attends densely (query head i reads KV head
    i // (Hq / Hkv))."""
    kv_head = op.Div(op.Range(0, num_heads, 1), num_heads // kv_num_heads)  # (Hq,) integer division
    dense = op.Equal(kv_head, dense_kv_heads[0])
    for head in dense_kv_heads[1:]:
        dense = op.Or(dense, op.Equal(kv_head, head))
    return op.Reshape(dense, [1, num_heads, 1, 1])


def cached_attention_to_standard(q, k, v, k_cache, v_cache, positions, cos=None, sin=None, num_heads=1,
                                 kv_num_heads=1, window=-1, scale=0.0, rotary=False, sinks=0, stride=0, ring=False,
                                 dense_kv_heads=None, softcap=0.0, k_scale=None, v_scale=None):
    head_dim, capacity = _static_dim(k_cache, 3), _static_dim(k_cache, 2)
    rotary_dim = _static_dim(cos, 1) if rotary else head_dim  # (before a cast hides the tables' shape)
    q, k, v, cos, sin, cast_back = _in_cache_dtype(k_cache, q, k, v, cos, sin)
    q4 = op.Transpose(op.Reshape(q, [0, 0, num_heads, head_dim]), perm=[0, 2, 1, 3])  # (B, Hq, S, D)
    k4 = op.Transpose(op.Reshape(k, [0, 0, kv_num_heads, head_dim]), perm=[0, 2, 1, 3])  # (B, Hkv, S, D)
    v4 = op.Transpose(op.Reshape(v, [0, 0, kv_num_heads, head_dim]), perm=[0, 2, 1, 3])
    if rotary:  # rows (B, 1, S, D) or (1, 1, S, D)
        cos_rows = op.Gather(cos, _rows_positions(positions), axis=0)
        sin_rows = op.Gather(sin, _rows_positions(positions), axis=0)
        q4 = _rotate(q4, cos_rows, sin_rows, rotary_dim, head_dim)
        k4 = _rotate(k4, cos_rows, sin_rows, rotary_dim, head_dim)
    attributes = {"scale": scale} if scale else {}
    if softcap:
        attributes["softcap"] = softcap
    if ring:
        if dense_kv_heads:
            raise ValueError("ring caches cannot hold dense heads (they need every position)")
        if len(positions.shape) != 2:
            raise ValueError("ring caches need per-row positions (B, S)")
        out4, new_k, new_v = _ring_attention(q4, k4, v4, k_cache, v_cache, positions, window, sinks, attributes)
        out = op.Reshape(op.Transpose(out4, perm=[0, 2, 1, 3]), [0, 0, num_heads * head_dim])
        return (op.Cast(out, to=FLOAT) if cast_back else out), new_k, new_v
    indices = _scatter_indices(k4, _rows_positions(positions))
    if _is_int8(k_cache):  # store codes, attend over codes * scale (what GroupQueryAttention does inside)
        if ring:
            raise ValueError("int8 KV caches are not available with ring caches")
        k_step, v_step = (op.Reshape(t, [1, kv_num_heads, 1, head_dim]) for t in (k_scale, v_scale))
        new_k = op.ScatterND(k_cache, indices, _quantize(k4, k_step))
        new_v = op.ScatterND(v_cache, indices, _quantize(v4, v_step))
        keys_read, values_read = op.Mul(op.Cast(new_k, to=FLOAT), k_step), op.Mul(op.Cast(new_v, to=FLOAT), v_step)
    else:
        new_k = op.ScatterND(k_cache, indices, k4)
        new_v = op.ScatterND(v_cache, indices, v4)
        keys_read, values_read = new_k, new_v
    keys = op.Range(0, capacity, 1)  # (T,)
    queries = op.Unsqueeze(_rows_positions(positions), [3])  # (B or 1, 1, S, 1)
    mask = op.LessOrEqual(keys, queries)  # (B or 1, 1, S, T)
    if window > 0:
        visible = op.Greater(keys, op.Sub(queries, window))
        if sinks > 0:
            visible = op.Or(visible, op.Less(keys, sinks))
        if stride > 0:
            visible = op.Or(visible, op.Equal(op.Mod(op.Sub(queries, keys), stride), 0))
        if dense_kv_heads:
            visible = op.Or(visible, _dense_heads(num_heads, kv_num_heads, dense_kv_heads))  # (B, Hq, S, T)
        mask = op.And(mask, visible)
    out4 = op.Attention(q4, keys_read, values_read, mask, **attributes)[0]  # (B, Hq, S, D); GQA from head counts
    out = op.Reshape(op.Transpose(out4, perm=[0, 2, 1, 3]), [0, 0, num_heads * head_dim])
    return (op.Cast(out, to=FLOAT) if cast_back else out), new_k, new_v


def _quantize(x4, step):
    """int8 codes round(x / step) clipped to [-128, 127] (Round: half to even, as torch.round and ORT's GQA)."""
    return op.Cast(op.Clip(op.Round(op.Div(x4, step)), op.Constant(value_float=-128.0),
                           op.Constant(value_float=127.0)), to=INT8)


def translation_table(attention_impl: str) -> dict:
    import torch

    from ...capture import custom_ops  # noqa: F401  (registers the op)

    if attention_impl == "gqa":
        register_ort_contrib_schema("GroupQueryAttention")
        return {torch.ops.agentopt.cached_attention.default: cached_attention_to_gqa}
    return {torch.ops.agentopt.cached_attention.default: cached_attention_to_standard}
