import pytest
import torch
import torch.nn.functional as F

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
    assert {n.args[10] for n in gm.graph.nodes if str(n.target) == FUSED} == {4}  # window argument
    _assert_same_outputs(gm, reference, 100)  # 11 tokens > window 4: the mask matters


def test_per_layer_windows_are_carried_into_each_layers_op():
    # Qwen2 / Gemma 3 style: only the layers layer_types names sliding_attention are windowed
    config = ModelConfig(family="qwen2", vocab_size=100, hidden_size=64, intermediate_size=96, num_layers=3,
                         num_heads=4, num_kv_heads=2, max_position_embeddings=64, sliding_window=4, qkv_bias=True,
                         layer_types=("full_attention", "sliding_attention", "full_attention"))
    gm, reference, result = _fused_and_reference(build_model(config, seed=2))
    assert result.stats["fused_attention"] == 3
    assert [n.args[10] for n in gm.graph.nodes if str(n.target) == FUSED] == [-1, 4, -1]
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
