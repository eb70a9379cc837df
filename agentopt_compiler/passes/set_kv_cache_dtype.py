"""Pass ``set_kv_cache_dtype``: store the KV caches in half precision, and run attention in it.

Before (fp32 caches, T slots each):            After (--kv-cache-dtype fp16):
    k_cache, v_cache: (B, Hkv, T, D) fp32          k_cache, v_cache: (B, Hkv, T, D) fp16
    out, k', v' = agentopt.cached_attention(       out, k', v' = agentopt.cached_attention(q, k, v, k_cache, ...)
        q, k, v, k_cache, v_cache, ...)                 # the op casts q/k/v and the RoPE tables to the caches' dtype,
                                                        # attends in fp16 and casts the output back to fp32

Why: the KV cache is the memory that grows with the agent's context: half precision halves it (and the bytes each
decode step reads). ONNX Runtime's CUDA GroupQueryAttention exists only for fp16/bf16, so on CUDA this is what lets
attention run as one fused kernel on the GPU. The rest of the model (projections, norms, logits) stays as it was.

Only caches that belong to a fused attention change (the pass needs ``fuse_kv_cache``); the lowering sees the dtype
on the cache tensors and emits the casts around the attention op.
"""

from __future__ import annotations

import torch

from ..capture.custom_ops import CachedAttentionArgs
from ..errors import AgentOptError
from .infra import GraphPass, PassResult, owner_of

DTYPES = {"fp32": torch.float32, "fp16": torch.float16}


class SetKVCacheDtype(GraphPass):
    name = "set_kv_cache_dtype"

    def __init__(self, dtype: str | None = None):
        if dtype is not None and dtype not in DTYPES:
            raise AgentOptError(f"KV cache dtype '{dtype}' is not available; choose one of: {', '.join(DTYPES)}")
        self.dtype = dtype

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        if self.dtype in (None, "fp32"):
            return PassResult(False, {}, ("KV caches stay fp32",))
        attention = [n for n in gm.graph.nodes if n.target == torch.ops.agentopt.cached_attention.default]
        if not attention:
            raise AgentOptError(f"--kv-cache-dtype {self.dtype} needs fused attention; fuse_kv_cache must run first "
                                "(do not skip it)")
        dtype = DTYPES[self.dtype]
        for node in attention:
            args = CachedAttentionArgs.of(node)
            for cache in (args.k_cache, args.v_cache):
                owner, leaf = owner_of(gm, cache.target)
                setattr(owner, leaf, getattr(owner, leaf).to(dtype))
        return PassResult(True, {f"{self.dtype}_caches": 2 * len(attention)}, ())

