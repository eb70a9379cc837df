"""Soft-capped attention (Gemma 2 style) and partial rotary (Phi-3 style) through both lowerings of the fused op,
against its eager semantics over a chunked prefill and decode steps (ORT's own graph optimizations off)."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from agentopt_compiler.backends.onnxruntime.lower import lower_to_onnx
from agentopt_compiler.capture.custom_ops import CachedAttentionArgs  # noqa: F401  (registers the op)
from agentopt_compiler.capture.export import capture

CONTEXT, HEAD_DIM = 32, 32


class OneLayer(nn.Module):
    """Embedding -> q/k/v -> agentopt.cached_attention -> logits: the op alone, with a given softcap / RoPE width."""

    def __init__(self, softcap=0.0, rotary_dim=0, window=-1):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.o = nn.Embedding(50, 64), nn.Linear(64, 50)
        self.q, self.k, self.v = nn.Linear(64, 64), nn.Linear(64, HEAD_DIM), nn.Linear(64, HEAD_DIM)
        with torch.no_grad():
            for p in self.parameters():
                p.normal_(0, 0.5)
        self.softcap, self.window, self.rotary_dim = softcap, window, rotary_dim
        if rotary_dim:
            angles = torch.outer(torch.arange(CONTEXT).float(), 0.5 ** torch.arange(rotary_dim // 2).float())
            self.register_buffer("cos", torch.cat([angles, angles], -1).cos())  # (T, R)
            self.register_buffer("sin", torch.cat([angles, angles], -1).sin())

    def setup_cache(self, batch, capacity):
        self.register_buffer("k_cache", torch.zeros(batch, 1, capacity, HEAD_DIM), persistent=False)
        self.register_buffer("v_cache", torch.zeros(batch, 1, capacity, HEAD_DIM), persistent=False)

    def forward(self, input_ids, positions, logits_index):
        x = self.embed(input_ids)
        cos, sin = (self.cos, self.sin) if self.rotary_dim else (None, None)
        out, k, v = torch.ops.agentopt.cached_attention(
            self.q(x), self.k(x), self.v(x), self.k_cache, self.v_cache, positions, cos, sin, 2, 1, self.window,
            0.0, bool(self.rotary_dim), 0, 0, False, None, self.softcap)
        self.k_cache.copy_(k)
        self.v_cache.copy_(v)
        return self.o(out).gather(1, logits_index[:, :, None].expand(-1, -1, 50))


@pytest.mark.parametrize("impl", ["gqa", "standard"])
@pytest.mark.parametrize("softcap, rotary_dim, window", [(3.0, 0, -1), (3.0, 0, 4), (0.0, 16, -1), (0.0, 8, -1)])
def test_lowering_matches_the_op(impl, softcap, rotary_dim, window, tmp_path):
    # rotary 16 of 32: GQA rotates inside (R/2 = 8); rotary 8: R/2 = 4, which GQA does not take: RoPE before it
    section = lower_to_onnx(capture(OneLayer(softcap, rotary_dim, window), CONTEXT), tmp_path, attention_impl=impl)
    layer = section["attention"]["layers"][0]
    assert layer["op"] == ("GroupQueryAttention" if impl == "gqa" else "Attention")
    assert layer.get("softcap", 0.0) == softcap and layer["window"] == max(window, 0)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    caches = {c["input"]: np.zeros(c["shape"], np.float32) for c in section["caches"]}
    reference = OneLayer(softcap, rotary_dim, window)
    reference.setup_cache(1, CONTEXT)
    ids = np.random.default_rng(0).integers(0, 50, (1, 14))
    worst = 0.0
    for a, b in [(0, 7), (7, 8), (8, 12), (12, 13), (13, 14)]:
        args = (ids[:, a:b], np.arange(a, b)[None], np.arange(b - a)[None])
        result = dict(zip(names, session.run(names, dict(zip(("input_ids", "positions", "logits_index"), args),
                                                          **caches))))
        caches.update({c["input"]: result[c["output"]] for c in section["caches"]})
        with torch.no_grad():
            expected = reference(*(torch.from_numpy(a) for a in args)).numpy()
        worst = max(worst, float(np.abs(result["logits"] - expected).max()))
    assert worst <= 1e-4
