"""Static per-channel scales for int8 KV caches (``--kv-cache-dtype int8``), calibrated on the eager model.

    v_scale[c] = max |v[c]| / 127                  per channel of V, over the calibration tokens
    k_scale[c] = sqrt(2) * max_{c' in head} |k[c']| / 127    per head of K, before RoPE

K is stored after RoPE, which rotates pairs of channels: a rotated value is at most the norm of its pair, so at most
sqrt(2) times the head's largest pre-RoPE magnitude; a per-head scale with that bound never clips a value the
calibration saw, whatever the positions (the projections' outputs are observed, not the rotated keys inside the
attention). V has no rotation: its own channels. Values beyond what calibration saw are clipped to +-127 steps.
K and V thus get different granularities (per head, per channel), as the issue asked for.
"""

from __future__ import annotations

import math

import torch

from ..errors import AgentOptError


def kv_cache_scales(model, batches: list[torch.Tensor], num_kv_heads: int | None = None
                    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """One (k_scale, v_scale) pair per layer, each (Hkv*D,) fp32, from the k_proj / v_proj outputs of ``model``
    on ``batches``."""
    projections = {name: module for name, module in model.named_modules() if name.endswith(("k_proj", "v_proj"))}
    keys = [name for name in projections if name.endswith("k_proj")]
    if not keys or len(projections) != 2 * len(keys):
        raise AgentOptError("int8 KV caches need the model's k_proj and v_proj modules to calibrate their scales; "
                            "this model has none (a fused qkv projection?): use --kv-cache-dtype fp16")
    peaks: dict[str, torch.Tensor] = {}

    def observe(name):
        def hook(module, args, output):
            peak = output.detach().abs().reshape(-1, output.shape[-1]).amax(0).float()
            peaks[name] = peak if name not in peaks else torch.maximum(peaks[name], peak)
        return hook

    hooks = [module.register_forward_hook(observe(name)) for name, module in projections.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                model(batch)
    finally:
        for hook in hooks:
            hook.remove()
    heads = num_kv_heads or model.config.num_kv_heads
    scales = []
    for k_name in keys:
        k_peak, v_peak = peaks[k_name], peaks[k_name[:-len("k_proj")] + "v_proj"]
        per_head = k_peak.view(heads, -1).amax(-1, keepdim=True).expand(heads, k_peak.numel() // heads)
        k_scale = (math.sqrt(2) * per_head.reshape(-1) / 127).clamp_min(1e-8)
        v_scale = (v_peak / 127).clamp_min(1e-8)
        scales.append((k_scale.contiguous(), v_scale.contiguous()))
    return scales
