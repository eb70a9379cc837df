"""The compile pipeline, in the order it runs. Read this file to know what ``agentopt compile`` does to a graph.

Phase 1, canonicalize: make the captured graph regular, so each later fusion needs one pattern.
    remove_noop_ops      identity casts, clones, metadata asserts, eval-mode dropout
Phase 2, fuse: replace op patterns with one op of ours that backends lower to their fastest kernel.
    fuse_kv_cache        RoPE + cache write + head expansion + SDPA -> agentopt::cached_attention
    pack_qkv_projections the three projections feeding a fused attention -> one matmul + split
Later phases (see the open issues): insert sparse attention, apply a precision plan.
"""

from __future__ import annotations

from .fuse_kv_cache import FuseKVCache
from .infra import PassPipeline
from .pack_qkv_projections import PackQKVProjections
from .remove_noop_ops import RemoveNoopOps


def default_pipeline() -> PassPipeline:
    return PassPipeline([
        # phase 1: canonicalize
        RemoveNoopOps(),
        # phase 2: fuse
        FuseKVCache(),
        PackQKVProjections(),
    ])
