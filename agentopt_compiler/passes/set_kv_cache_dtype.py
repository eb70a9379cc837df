"""Pass ``set_kv_cache_dtype``: store the KV caches in half precision or as int8 codes.

Before (fp32 caches, T slots each):            After (--kv-cache-dtype fp16):
    k_cache, v_cache: (B, Hkv, T, D) fp32          k_cache, v_cache: (B, Hkv, T, D) fp16
    out, k', v' = agentopt.cached_attention(       out, k', v' = agentopt.cached_attention(q, k, v, k_cache, ...)
        q, k, v, k_cache, v_cache, ...)                 # the op casts q/k/v and the RoPE tables to the caches' dtype,
                                                        # attends in fp16 and casts the output back to fp32
                                               After (--kv-cache-dtype int8):
                                                   k_cache, v_cache: (B, Hkv, T, D) int8
                                                   out, k', v' = agentopt.cached_attention(..., k_scale, v_scale)
                                                        # stores round(k_roped / k_scale), round(v / v_scale);
                                                        # attends in fp32 on codes * scale

Why: the KV cache is the memory that grows with the agent's context: half precision halves it (and the bytes each
decode step reads), int8 quarters it against fp32. ONNX Runtime's CUDA GroupQueryAttention exists only for fp16/bf16,
so on CUDA fp16 is what lets attention run as one fused kernel on the GPU; ORT's CPU GroupQueryAttention (1.32) reads
and writes int8 caches itself with per-channel scales (``k_quant_type`` / ``v_quant_type`` PER_CHANNEL), and the
standard lowering quantizes and dequantizes around ScatterND / Attention. The rest of the model stays as it was.

int8 scales are static, one per channel of K (after RoPE) and of V per layer, calibrated on the eager model
(analysis/kv_quantization.py): the pass takes them, one (k_scale, v_scale) pair per fused attention in graph order.
Not with ring caches (sparse layers that keep a ring): their lowering has no quantized path yet.

Only caches that belong to a fused attention change (the pass needs ``fuse_kv_cache``); the lowering sees the dtype
on the cache tensors and emits the casts (or the quantized attention) around the attention op.
"""

from __future__ import annotations

import torch

from ..capture.custom_ops import CachedAttentionArgs
from ..errors import AgentOptError
from .infra import GraphPass, PassResult, owner_of

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "int8": torch.int8}


class SetKVCacheDtype(GraphPass):
    name = "set_kv_cache_dtype"

    def __init__(self, dtype: str | None = None, scales: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        if dtype is not None and dtype not in DTYPES:
            raise AgentOptError(f"KV cache dtype '{dtype}' is not available; choose one of: {', '.join(DTYPES)}")
        self.dtype = dtype
        self.scales = scales  # int8: per fused attention in graph order, (k_scale, v_scale) each (Hkv*D,) fp32

    def call(self, gm: torch.fx.GraphModule) -> PassResult:
        if self.dtype in (None, "fp32"):
            return PassResult(False, {}, ("KV caches stay fp32",))
        attention = [n for n in gm.graph.nodes if n.target == torch.ops.agentopt.cached_attention.default]
        if not attention:
            raise AgentOptError(f"--kv-cache-dtype {self.dtype} needs fused attention; fuse_kv_cache must run first "
                                "(do not skip it)")
        if self.dtype == "int8":
            self._check_int8(attention)
        dtype = DTYPES[self.dtype]
        for index, node in enumerate(attention):
            args = CachedAttentionArgs.of(node)
            for cache in (args.k_cache, args.v_cache):
                owner, leaf = owner_of(gm, cache.target)
                setattr(owner, leaf, torch.zeros_like(getattr(owner, leaf), dtype=dtype))
            if self.dtype == "int8":
                args.k_scale, args.v_scale = (self._scale_node(gm, node, f"kv_scale_{index}_{kind}", scale)
                                              for kind, scale in zip("kv", self.scales[index]))
                args.write_to(node)
        return PassResult(True, {f"{self.dtype}_caches": 2 * len(attention)}, ())

    def _check_int8(self, attention) -> None:
        if self.scales is None:
            raise AgentOptError("--kv-cache-dtype int8 needs per-channel scales calibrated on the model: ao.compile "
                                "computes them; passes run by hand take SetKVCacheDtype('int8', scales="
                                "kv_cache_scales(model, batches)) (analysis/kv_quantization.py)")
        if len(self.scales) != len(attention):
            raise AgentOptError(f"int8 KV caches: {len(self.scales)} scale pairs for {len(attention)} fused "
                                "attention layers; calibrate them on this model")
        for index, node in enumerate(attention):
            args = CachedAttentionArgs.of(node)
            if args.ring:
                raise AgentOptError(f"--kv-cache-dtype int8 is not available with ring caches (layer {index} keeps a "
                                    "ring for its sparse pattern); use --kv-cache-dtype fp16 there, or a sparse plan "
                                    "without ring caches")
            shape = args.k_cache.meta["val"].shape if "val" in args.k_cache.meta else None
            channels = None if shape is None else shape[1] * shape[3]
            for scale in self.scales[index]:
                if scale.dim() != 1 or (channels is not None and scale.numel() != channels) or not bool(
                        (scale > 0).all()):
                    raise AgentOptError(f"int8 KV caches: layer {index} needs positive scales of {channels} channels "
                                        f"(Hkv * D), got shape {tuple(scale.shape)}")

    @staticmethod
    def _scale_node(gm, node, name: str, scale: torch.Tensor):
        gm.register_buffer(name, scale.detach().to(torch.float32).contiguous())
        with gm.graph.inserting_before(node):
            return gm.graph.get_attr(name)
