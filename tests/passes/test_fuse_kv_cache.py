import pytest
import torch
import torch.nn.functional as F

from agentopt_compiler.capture.custom_ops import CachedAttentionArgs
from agentopt_compiler.capture.export import capture
from agentopt_compiler.models.config import ModelConfig
from agentopt_compiler.models.registry import build_model
from agentopt_compiler.passes.fuse_kv_cache import FuseKVCache
from agentopt_compiler.passes.infra import op_histogram
from agentopt_compiler.passes.remove_noop_ops import RemoveNoopOps

FUSED = "agentopt.cached_attention.default"


def _fused_and_reference(module, context=32, batch=1):
    """(rewritten GraphModule, untouched GraphModule of the same capture, pass result)."""
    if hasattr(module, "setup_cache"):
        program = capture(module, context, batch_size=batch)
    else:
        from torch.export import Dim
        seq = Dim("seq", min=1, max=context)
        ep = torch.export.export(module, (torch.zeros(batch, 2, dtype=torch.long), torch.arange(2)),
                                 dynamic_shapes={"input_ids": {1: seq}, "positions": {0: seq}}, strict=False)
        gm, reference = ep.module(), ep.module()
        RemoveNoopOps()(gm)
        return gm, reference, FuseKVCache()(gm)
    gm, reference = program.module, program.module
    RemoveNoopOps()(gm)
    return gm, reference, FuseKVCache()(gm)


def _assert_same_outputs(gm, reference, vocab, steps=((0, 6), (6, 7), (7, 10), (10, 11)), batch=1):
    """Run both graphs over the same calls; our decoder's graphs take per-row positions and a logits index."""
    ids = torch.randint(0, vocab, (batch, 11), generator=torch.Generator().manual_seed(0))
    per_row = len([n for n in gm.graph.nodes if n.op == "placeholder"]) == 3
    with torch.no_grad():
        for a, b in steps:  # prefill, decode, a chunk, decode: each reads what the previous calls cached
            if per_row:  # row r runs r tokens behind row 0, so rows sit at different positions
                positions = torch.stack([torch.arange(a, b) - min(r, a) for r in range(batch)])
                args = (ids[:, a:b], positions, torch.full((batch, 1), b - a - 1))
            else:
                args = (ids[:, a:b], torch.arange(a, b))
            expected = reference(*args)
            assert (gm(*args) - expected).abs().max().item() <= 1e-6


def test_fuses_every_layer_of_the_reference_decoder(tiny_model):
    gm, reference, result = _fused_and_reference(tiny_model)
    before, after = op_histogram(reference), op_histogram(gm)
    assert result.stats == {"fused_attention": 2, "with_rope": 2}
    assert before["aten.scaled_dot_product_attention.default"] == 2 and after[
        "aten.scaled_dot_product_attention.default"] == 0
    assert before["aten.scatter_.src"] == 4 and after["aten.scatter_.src"] == 0
    assert before["aten.repeat_interleave.self_int"] == 4 and after["aten.repeat_interleave.self_int"] == 0
    assert after[FUSED] == 2 and after["aten.copy_.default"] == 4
    assert after["aten.cat.default"] == 0 and after["aten.neg.default"] == 0  # RoPE went into the op
    assert sum(after.values()) < sum(before.values()) - 50
    _assert_same_outputs(gm, reference, 320)


def test_fuses_a_batch_whose_rows_are_at_different_positions(tiny_model):
    gm, reference, result = _fused_and_reference(tiny_model, batch=3)
    assert result.stats["fused_attention"] == 2
    _assert_same_outputs(gm, reference, 320, batch=3)


def test_sliding_window_is_carried_into_the_op():
    config = ModelConfig(family="mistral", vocab_size=100, hidden_size=64, intermediate_size=96, num_layers=2,
                         num_heads=4, num_kv_heads=4, max_position_embeddings=64, sliding_window=4)
    gm, reference, result = _fused_and_reference(build_model(config, seed=2))
    assert result.stats["fused_attention"] == 2
    assert {CachedAttentionArgs.of(n).window for n in gm.graph.nodes if str(n.target) == FUSED} == {4}
    _assert_same_outputs(gm, reference, 100)  # 11 tokens > window 4: the mask matters


def test_per_layer_windows_are_carried_into_each_layers_op():
    # Qwen2 / Gemma 3 style: only the layers layer_types names sliding_attention are windowed
    config = ModelConfig(family="qwen2", vocab_size=100, hidden_size=64, intermediate_size=96, num_layers=3,
                         num_heads=4, num_kv_heads=2, max_position_embeddings=64, sliding_window=4, qkv_bias=True,
                         layer_types=("full_attention", "sliding_attention", "full_attention"))
    gm, reference, result = _fused_and_reference(build_model(config, seed=2))
    assert result.stats["fused_attention"] == 3
    assert [CachedAttentionArgs.of(n).window for n in gm.graph.nodes if str(n.target) == FUSED] == [-1, 4, -1]
    _assert_same_outputs(gm, reference, 100)


class PlainSdpaAttention(torch.nn.Module):
    """Attention as other codebases write it: no RoPE, ``cache[:, :, pos] = k`` (index_put_), heads expanded the
    Hugging Face way (unsqueeze + expand + reshape), a position mask."""

    def __init__(self, vocab=64, dim=32, heads=4, kv_heads=2, capacity=32):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embed = torch.nn.Embedding(vocab, dim)
        self.q, self.k = torch.nn.Linear(dim, dim), torch.nn.Linear(dim, kv_heads * self.head_dim)
        self.v, self.o = torch.nn.Linear(dim, kv_heads * self.head_dim), torch.nn.Linear(dim, vocab)
        self.register_buffer("k_cache", torch.zeros(1, kv_heads, capacity, self.head_dim))
        self.register_buffer("v_cache", torch.zeros(1, kv_heads, capacity, self.head_dim))
        self.capacity = capacity

    def _expand(self, x):
        b, h, t, d = x.shape
        n = self.heads // self.kv_heads
        return x[:, :, None].expand(b, h, n, t, d).reshape(b, h * n, t, d)

    def forward(self, input_ids, positions):
        x = self.embed(input_ids)
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        self.k_cache[:, :, positions] = k
        self.v_cache[:, :, positions] = v
        mask = torch.arange(self.capacity)[None, :] <= positions[:, None]
        o = F.scaled_dot_product_attention(q, self._expand(self.k_cache), self._expand(self.v_cache), attn_mask=mask)
        return self.o(o.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


def test_fuses_plain_sdpa_with_an_index_put_cache():
    torch.manual_seed(0)
    gm, reference, result = _fused_and_reference(PlainSdpaAttention())
    assert result.stats == {"fused_attention": 1, "with_rope": 0}
    assert op_histogram(gm)["aten.index_put_.default"] == 0
    _assert_same_outputs(gm, reference, 64, steps=((0, 5), (5, 6), (6, 8), (8, 9)))


class NonCausal(PlainSdpaAttention):
    def forward(self, input_ids, positions):  # attends to every cache slot: not a causal cache
        x = self.embed(input_ids)
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        self.k_cache[:, :, positions] = self.k(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        self.v_cache[:, :, positions] = self.v(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        mask = torch.ones(s, self.capacity, dtype=torch.bool)
        o = F.scaled_dot_product_attention(q, self._expand(self.k_cache), self._expand(self.v_cache), attn_mask=mask)
        return self.o(o.transpose(1, 2).reshape(b, s, -1))


class CacheReadElsewhere(PlainSdpaAttention):
    def forward(self, input_ids, positions):
        out = super().forward(input_ids, positions)
        return out + self.k_cache.mean()  # a second reader of the cache


@pytest.mark.parametrize("module, reason", [(NonCausal, "not causal"), (CacheReadElsewhere, "read elsewhere")])
def test_does_not_fire(module, reason):
    torch.manual_seed(0)
    gm, reference, result = _fused_and_reference(module())
    assert not result.modified and result.stats == {}
    assert op_histogram(gm)[FUSED] == 0
    assert any(reason in note for note in result.notes), result.notes


class HfStyleRope(PlainSdpaAttention):
    """RoPE as transformers writes it: rotate_half by slices x[..., :D/2] / x[..., D/2:], tables indexed by position,
    optionally on the first ``rotary`` dims only (Phi-3's partial rotary: cat(rope(x[..., :R]), x[..., R:])); a norm
    over each head's dims after the head transpose (Gemma 3's QK-norm), so no (B, S, H*D) tensor feeds the op."""

    def __init__(self, rotary=8, rotary_last=False, **kwargs):
        super().__init__(**kwargs)
        self.rotary, self.rotary_last = rotary, rotary_last
        inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary, 2).float() / rotary)
        freqs = torch.outer(torch.arange(self.capacity).float(), inv_freq)
        self.register_buffer("cos", torch.cat([freqs, freqs], -1).cos())  # (T, R)
        self.register_buffer("sin", torch.cat([freqs, freqs], -1).sin())

    def _rope(self, x, cos, sin):
        def rotate_half(t):
            return torch.cat((-t[..., t.shape[-1] // 2:], t[..., : t.shape[-1] // 2]), dim=-1)

        if self.rotary == x.shape[-1]:
            return x * cos + rotate_half(x) * sin
        if self.rotary_last:  # the last R dims rotated: not a layout the fused op takes
            kept, turned = x[..., : x.shape[-1] - self.rotary], x[..., x.shape[-1] - self.rotary:]
            return torch.cat([kept, turned * cos + rotate_half(turned) * sin], dim=-1)
        turned, kept = x[..., : self.rotary], x[..., self.rotary:]
        return torch.cat([turned * cos + rotate_half(turned) * sin, kept], dim=-1)

    def forward(self, input_ids, positions):
        x = self.embed(input_ids)
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        q = q * torch.rsqrt(q.pow(2).mean(-1, keepdim=True) + 1e-6)  # per-head norm after the transpose
        k = self.k(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.cos[positions][None, None], self.sin[positions][None, None]  # (1, 1, S, R)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        self.k_cache[:, :, positions] = k
        self.v_cache[:, :, positions] = v
        mask = torch.arange(self.capacity)[None, :] <= positions[:, None]
        o = F.scaled_dot_product_attention(q, self._expand(self.k_cache), self._expand(self.v_cache), attn_mask=mask)
        o = o.reshape(b, self.heads, s, self.head_dim)  # transformers' no-op reshape before the merge
        return self.o(o.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


@pytest.mark.parametrize("rotary", [8, 4])  # head dim 8: full, then partial rotary
def test_fuses_transformers_style_rope_partial_rotary_and_per_head_norms(rotary):
    torch.manual_seed(0)
    gm, reference, result = _fused_and_reference(HfStyleRope(rotary=rotary))
    assert result.stats == {"fused_attention": 1, "with_rope": 1}
    after = op_histogram(gm)
    assert after["aten.slice.Tensor"] == 0 and after["aten.neg.default"] == 0 and after["aten.cat.default"] == 0
    assert CachedAttentionArgs.of(next(n for n in gm.graph.nodes if str(n.target) == FUSED)).cos.meta[
        "val"].shape[-1] == rotary  # the op rotates the table's width
    _assert_same_outputs(gm, reference, 64, steps=((0, 5), (5, 6), (6, 8), (8, 9)))


def test_rope_on_the_last_dims_is_not_read_as_partial_rotary():
    # cat(x[..., :D-R], rope(x[..., D-R:])) is not the fused op's layout: the RoPE must stay outside the op, as
    # ordinary ops on q and k, and attention still fuses (without RoPE) to the same outputs
    torch.manual_seed(0)
    gm, reference, result = _fused_and_reference(HfStyleRope(rotary=4, rotary_last=True))
    assert result.stats == {"fused_attention": 1, "with_rope": 0}
    assert op_histogram(gm)["aten.neg.default"] == 2  # q's and k's rotate_half are still there
    _assert_same_outputs(gm, reference, 64, steps=((0, 5), (5, 6), (6, 8), (8, 9)))
