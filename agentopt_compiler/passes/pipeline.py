"""The compile pipeline, in the order it runs. Read this file to know what ``agentopt compile`` does to a graph.

Phase 1, canonicalize: make the captured graph regular, so each later fusion needs one pattern.
    remove_noop_ops      identity casts, clones, metadata asserts, eval-mode dropout
Phase 2, fuse: replace op patterns with one op of ours that backends lower to their fastest kernel.
    fuse_kv_cache        RoPE + cache write + head expansion + SDPA -> agentopt::cached_attention
    pack_qkv_projections the three projections feeding a fused attention -> one matmul + split
Phase 3, change the math where the user asked for it (each pass does nothing without its plan):
    insert_sparse_attention  per-layer window / sinks / strided patterns on the fused attention
    set_kv_cache_dtype       fp16 KV caches (attention in fp16) or int8 ones (per-channel scales) where
                             --kv-cache-dtype asks for it
    assign_layer_precision   int8 / int4 weight-only linears where a precision plan says so; fp16 / bf16
                             regions (explicit casts) where the target has native half kernels
"""

from __future__ import annotations

from .fuse_kv_cache import FuseKVCache
from .infra import PassPipeline
from .assign_layer_precision import AssignLayerPrecision
from .insert_sparse_attention import InsertSparseAttention, SparseAttentionPlan
from .pack_qkv_projections import PackQKVProjections
from .precision_plan import PrecisionPlan
from .remove_noop_ops import RemoveNoopOps
from .set_kv_cache_dtype import SetKVCacheDtype


def default_pipeline(sparse_attention: SparseAttentionPlan | None = None,
                     precision: PrecisionPlan | None = None, half_precision: bool = False,
                     kv_cache_dtype: str | None = None, kv_scales=None) -> PassPipeline:
    return PassPipeline([
        # phase 1: canonicalize
        RemoveNoopOps(),
        # phase 2: fuse
        FuseKVCache(),
        PackQKVProjections(),
        # phase 3: user-requested changes to the math
        InsertSparseAttention(sparse_attention),
        SetKVCacheDtype(kv_cache_dtype, kv_scales),
        AssignLayerPrecision(precision, half_precision),
    ])
